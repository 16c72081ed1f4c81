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
    def from_arrays(cls, user_id: str, window_end: int, items: Sequence[str], weights: Sequence[float],
                    counts: Sequence[int], max_items: int, max_events: int | None = None) -> "Increment":
        """``max_items``: keep the heaviest items. ``max_events``: a window with more events than this is
        scaled down to weigh as much as ``max_events`` events (a bot cannot outweigh everyone else).

        >>> Increment.from_arrays("bot", 60, ["a", "b"], [9000.0, 1000.0], [9000, 1000], 10, max_events=100).weights
        (90.0, 10.0)
        """
        if not (len(items) == len(weights) == len(counts)):
            raise ValueError(f"increment of {user_id!r}: items, weights and counts differ in length "
                             f"({len(items)}, {len(weights)}, {len(counts)})")
        events = int(sum(counts))
        scale = max_events / events if max_events is not None and events > max_events else 1.0
        # heaviest first, ties by item id (ids are distinct within an increment, so counts never decide)
        rows = sorted(zip([-float(w) for w in weights], items, counts))[:max_items]
        return cls(user_id, int(window_end), tuple(r[1] for r in rows), tuple(-r[0] * scale for r in rows),
                   tuple(int(r[2]) for r in rows), events, len(items) - len(rows))

    @classmethod
    def window_from_quads(cls, window_end: int, quads_json: str, max_items: int,
                          max_events: int | None = None) -> list["Increment"]:
        """A whole window of a model shard, ``[[user, item, weight, count], ...]``, as one increment per user,
        users in id order.

        The JVM aggregates a window's rows in the order they arrived, which depends on how the source's
        partitions interleaved; the model's micro-batches are consecutive chunks of this list. In id order,
        the same events give the same micro-batches, so a replay learns the same model every time (and the
        same as ``freshet tune``, and after a restore).

        >>> [(i.user_id, i.items) for i in Increment.window_from_quads(60, '[["v", "b", 2, 1], ["u", "a", 1, 1], ["u", "c", 3, 1]]', 10)]
        [('u', ('c', 'a')), ('v', ('b',))]
        """
        by_user: dict[str, tuple[list, list, list]] = {}
        for user, item, weight, count in json.loads(quads_json):
            cols = by_user.get(user)
            if cols is None:
                cols = by_user[user] = ([], [], [])
            cols[0].append(item)
            cols[1].append(weight)
            cols[2].append(count)
        return [cls.from_arrays(user, window_end, *by_user[user], max_items, max_events) for user in sorted(by_user)]


@dataclass
class WindowBuffer:
    """Holds increments until their window closes; then hands over closed windows in ``window_end`` order.

    The model splits each closed window into micro-batches of ``model.batch_size`` increments (one
    optimizer step each); all windows closed by one watermark advance are learned in one model call.

    >>> b = WindowBuffer()
    >>> for user, end in [("u1", 20), ("u2", 10), ("u3", 30)]:
    ...     b.add(Increment(user, end, ("a",), (1.0,), (1,), 1))
    >>> [(end, [i.user_id for i in incs]) for end, incs in b.close(watermark=25)]
    [(10, ['u2']), (20, ['u1'])]
    >>> len(b)
    1
    """
    _windows: dict[int, list[Increment]] = field(default_factory=dict)

    def add(self, inc: Increment) -> None:
        self._windows.setdefault(inc.window_end, []).append(inc)

    def close(self, watermark: int) -> list[tuple[int, list[Increment]]]:
        """Windows whose last millisecond (``window_end - 1``) the watermark has reached."""
        ends = sorted(e for e in self._windows if e - 1 <= watermark)
        return [(e, self._windows.pop(e)) for e in ends]

    def next_end(self) -> int | None:
        """The earliest ``window_end`` still waiting (``None`` when empty)."""
        return min(self._windows) if self._windows else None

    def pending(self) -> list[Increment]:
        """Every increment still waiting, in window order."""
        return [inc for end in sorted(self._windows) for inc in self._windows[end]]

    def __len__(self) -> int:
        return sum(len(v) for v in self._windows.values())
