"""Prequential evaluation (CONTRACTS §3): score every logged event against what was already recommended.

For each event ``(u, i, t)`` the newest list for ``u`` with ``window_end <= t`` is looked up; a hit is ``i``
among its first K items. Events with no earlier list count as misses (``coverage`` says how many had one).

>>> recs = [{"user_id": "u", "items": ["a", "b"], "window_end": 10}]
>>> events = [("u", "b", 5), ("u", "b", 12), ("u", "z", 13), ("v", "a", 20)]
>>> r = evaluate(events, recs, ks=(1, 2))
>>> r.overall["events"], r.overall["HR@2"], r.overall["HR@1"], r.overall["coverage"]
(4, 0.25, 0.0, 0.5)
>>> round(r.overall["NDCG@2"], 4)   # one hit at rank 1: 1/log2(3) over 4 events
0.1577
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

DAY_MS = 86_400_000


class UserLists:
    """Each user's recommendation lists ordered by ``window_end``, for "newest list at or before t"."""

    def __init__(self, recs: Iterable[Mapping]):
        by_user: dict[str, list[tuple[int, Sequence[str]]]] = defaultdict(list)
        for r in recs:
            by_user[str(r["user_id"])].append((int(r["window_end"]), list(r["items"])))
        self._ends: dict[str, list[int]] = {}
        self._items: dict[str, list[Sequence[str]]] = {}
        for user, lists in by_user.items():
            lists.sort(key=lambda x: x[0])  # stable: of two lists for one window the later one wins
            self._ends[user] = [e for e, _ in lists]
            self._items[user] = [items for _, items in lists]

    def at(self, user: str, t: int) -> Sequence[str] | None:
        ends = self._ends.get(user)
        if not ends:
            return None
        j = bisect.bisect_right(ends, t) - 1
        return self._items[user][j] if j >= 0 else None


def _prequential(events: Iterable[tuple[str, str, int]], lists: UserLists) -> Iterator[tuple[int, int | None, bool]]:
    """For each event: (ts, 0-based rank of the item in the list or None, whether a list existed)."""
    for user, item, ts in events:
        items = lists.at(str(user), int(ts))
        if items is None:
            yield int(ts), None, False
            continue
        try:
            rank = list(items).index(str(item))
        except ValueError:
            rank = None
        yield int(ts), rank, True


@dataclass
class _Tally:
    ks: tuple[int, ...]
    events: int = 0
    covered: int = 0
    hits: dict[int, int] = field(default_factory=dict)
    gains: dict[int, float] = field(default_factory=dict)

    def add(self, rank: int | None, covered: bool) -> None:
        self.events += 1
        self.covered += covered
        for k in self.ks:
            if rank is not None and rank < k:
                self.hits[k] = self.hits.get(k, 0) + 1
                self.gains[k] = self.gains.get(k, 0.0) + 1.0 / math.log2(rank + 2)

    def summary(self) -> dict[str, float]:
        n = max(self.events, 1)
        out: dict[str, float] = {"events": self.events, "coverage": self.covered / n}
        for k in self.ks:
            out[f"HR@{k}"] = self.hits.get(k, 0) / n
            out[f"NDCG@{k}"] = self.gains.get(k, 0.0) / n
        return out


@dataclass(frozen=True)
class EvalResult:
    overall: dict[str, float]
    by_day: dict[int, dict[str, float]]   # day index (ts // 1 day) -> metrics

    def to_json(self) -> dict:
        return {"overall": self.overall, "by_day": {str(d): m for d, m in sorted(self.by_day.items())}}


def evaluate(events: Iterable[tuple[str, str, int]], recs: Iterable[Mapping], ks: Sequence[int] = (10, 20),
             slice_ms: int = DAY_MS) -> EvalResult:
    """HR@k, NDCG@k and coverage of ``recs`` on ``events`` (``(user, item, ts_ms)``, in event-time order)."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    lists = UserLists(recs)
    total = _Tally(ks)
    slices: dict[int, _Tally] = {}
    for ts, rank, covered in _prequential(events, lists):
        total.add(rank, covered)
        slices.setdefault(ts // slice_ms, _Tally(ks)).add(rank, covered)
    return EvalResult(total.summary(), {d: t.summary() for d, t in slices.items()})


class LiveHitRate:
    """Running HR@K inside the job: each window's events against the newest earlier list of their user.

    Feed it closed windows in ``window_end`` order: :meth:`score` before the window's own lists are known,
    then :meth:`remember` those lists. That is the prequential protocol, so the figure matches
    ``freshet eval`` on the same stream.

    >>> from freshet.models.increments import Increment
    >>> live = LiveHitRate(k=2)
    >>> live.score([Increment("u", 60, ("a",), (1.0,), (3,), 3)])      # no list yet: 3 misses
    >>> live.remember([("u", ["a", "b"])])
    >>> live.score([Increment("u", 120, ("b", "z"), (1.0, 1.0), (2, 1), 3)])
    >>> live.events, live.hits, round(live.hit_rate, 3)
    (6, 2, 0.333)
    """

    def __init__(self, k: int):
        self.k = k
        self.events = 0
        self.hits = 0
        self._lists: dict[str, frozenset[str]] = {}

    def score(self, increments) -> None:
        for inc in increments:
            top = self._lists.get(inc.user_id, frozenset())
            self.events += inc.events
            self.hits += sum(c for item, c in zip(inc.items, inc.counts) if item in top)

    def remember(self, lists) -> None:
        """``(user_id, items)`` pairs of the window just closed."""
        for user, items in lists:
            self._lists[user] = frozenset(items[: self.k])

    @property
    def hit_rate(self) -> float:
        return self.hits / self.events if self.events else 0.0
