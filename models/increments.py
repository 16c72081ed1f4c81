"""Increment tables (what one user did in one window) and their gathering into micro-batches.

>>> inc = Increment.from_arrays("u1", 60000, ["a", "b", "c"], [1.0, 5.0, 2.0], [1, 2, 1], max_items=2)
>>> inc.items, inc.weights, inc.events, inc.dropped_items
(('b', 'c'), (5.0, 2.0), 4, 1)
"""
from __future__ import annotations

import json

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Increment:
    """One (user, window) row of the increment table: items with accumulated weights and event counts."""
    user_id: str
    window_end: int
    items: tuple[str, ...]
    weights: tuple[float, ...]
    counts: tuple[int, ...]
    events: int            # accepted events of the user in the window (including any dropped items')
    dropped_items: int = 0  # distinct items beyond ``max_items`` that were left out (lightest first)

    @classmethod
    def from_json(cls, user_id: str, window_end: int, items_json: str, max_items: int) -> "Increment":
        """From the window aggregation's ``[[item, weight, count], ...]`` text."""
        rows = json.loads(items_json)
        return cls.from_arrays(user_id, window_end, [r[0] for r in rows], [r[1] for r in rows],
                               [r[2] for r in rows], max_items)

    @classmethod
    def from_arrays(cls, user_id: str, window_end: int, items: Sequence[str], weights: Sequence[float],
                    counts: Sequence[int], max_items: int) -> "Increment":
        if not (len(items) == len(weights) == len(counts)):
            raise ValueError(f"increment of {user_id!r}: items, weights and counts differ in length "
                             f"({len(items)}, {len(weights)}, {len(counts)})")
        events = int(sum(counts))
        order = sorted(range(len(items)), key=lambda j: (-weights[j], items[j]))
        kept = order[:max_items]
        return cls(user_id, int(window_end), tuple(items[j] for j in kept), tuple(float(weights[j]) for j in kept),
                   tuple(int(counts[j]) for j in kept), events, len(items) - len(kept))


@dataclass
class MicroBatcher:
    """Gathers increments; a micro-batch is due every ``batch_size`` increments and when a window closes.

    ``add`` returns a full batch to train on (or ``None``). ``close_window`` returns what is left to train on
    and every user whose list is due: all users with increments in windows that have closed.

    >>> b = MicroBatcher(batch_size=2)
    >>> b.add(Increment("u1", 10, ("a",), (1.0,), (1,), 1)) is None
    True
    >>> [i.user_id for i in b.add(Increment("u2", 10, ("a",), (1.0,), (1,), 1))]
    ['u1', 'u2']
    >>> rest, due = b.close_window(10)
    >>> rest, due
    ([], [('u1', 10), ('u2', 10)])
    """
    batch_size: int
    _buffer: list[Increment] = field(default_factory=list)
    _due: list[tuple[str, int]] = field(default_factory=list)

    def add(self, inc: Increment) -> list[Increment] | None:
        self._buffer.append(inc)
        self._due.append((inc.user_id, inc.window_end))
        if len(self._buffer) >= self.batch_size:
            batch, self._buffer = self._buffer, []
            return batch
        return None

    def close_window(self, watermark_end: int) -> tuple[list[Increment], list[tuple[str, int]]]:
        """Windows ending at or before ``watermark_end`` are complete: flush their increments and lists."""
        rest = [i for i in self._buffer if i.window_end <= watermark_end]
        self._buffer = [i for i in self._buffer if i.window_end > watermark_end]
        due = [d for d in self._due if d[1] <= watermark_end]
        self._due = [d for d in self._due if d[1] > watermark_end]
        return rest, due

    def __len__(self) -> int:
        return len(self._buffer)
