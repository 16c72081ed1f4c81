"""Rows of an embedding table for external ids: admission, expiry by event time, and a capacity bound.

Memory stays bounded by ``capacity`` whatever the number of distinct ids in the stream:

* **row 0 is the shared fallback row.** An id gets a row of its own only after ``admit_after``
  occurrences; until then it maps to row 0 (which still learns: it becomes the "rare id" vector).
  Occurrence counts of not-yet-admitted ids are kept for at most ``capacity`` ids (the stalest half
  is forgotten when that fills up).
* **expiry by event time.** :meth:`expire` frees the rows of ids unseen for ``expire_after_ms``.
* **capacity.** When all ``capacity`` rows are taken, the least recently seen rows that the current
  model call has not touched are evicted (``capacity // 64`` at a time, so eviction is amortised); if
  every row is in use by the current call, the newcomer shares the fallback row.

A freed row is handed out again; :meth:`drain_assigned` tells the model which rows got an id (new or
reused) so it can give them the id's initial values, and :meth:`drain_evicted` which ids left, so it can
forget what it kept about them.

>>> t = IdTable(capacity=2, admit_after=2)
>>> t.lookup("a", ts=10, step=0), t.lookup("a", ts=11, step=0)   # admitted on its 2nd occurrence
(0, 1)
>>> t.lookup("b", ts=12, step=0, count=3), t.lookup("c", ts=13, step=0, count=2, protect_from=0)
(2, 0)
>>> t.lookup("c", ts=14, step=5, count=1, protect_from=5)        # table full: "a" (stalest) is evicted
1
>>> t.drain_evicted(), t.drain_assigned(), t.get("a"), len(t)
([('a', 1)], [1, 2, 1], None, 2)
>>> t.expire(now=20, horizon=7), t.get("b")                      # "b" last seen at 12 < 20 - 7
(['b'], None)
"""
from __future__ import annotations

from itertools import repeat
from typing import Sequence

import numpy as np

NEVER = np.iinfo(np.int64).max


class IdIndex:
    """Maps external string ids to dense rows 0..n-1, in order of first appearance.

    >>> ix = IdIndex(); ix.add("x"), ix.add("y"), ix.add("x"), ix.get("z"), len(ix)
    (0, 1, 0, None, 2)
    """

    def __init__(self, ids: Sequence[str] = ()):
        self.ids: list[str] = list(ids)
        self.rows: dict[str, int] = {k: r for r, k in enumerate(self.ids)}

    def add(self, key: str) -> int:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = len(self.ids)
            self.ids.append(key)
        return row

    def get(self, key: str) -> int | None:
        return self.rows.get(key)

    def __len__(self) -> int:
        return len(self.ids)


class IdTable:
    FALLBACK = 0

    def __init__(self, capacity: int, admit_after: int = 1):
        if capacity < 1 or admit_after < 1:
            raise ValueError("capacity and admit_after must be >= 1")
        self.capacity = capacity
        self.admit_after = admit_after
        self.ids: list[str | None] = [None]          # row -> id; None for the fallback row and free rows
        self.rows: dict[str, int] = {}               # id -> row, admitted ids only
        self.last_seen = np.zeros(1, np.int64)       # row -> event time of its last occurrence
        self.last_step = np.full(1, -1, np.int64)    # row -> model step that last used it
        self.born = np.full(1, NEVER, np.int64)      # row -> model step at which its id got it
        self.free: list[int] = []
        self.pending: dict[str, list[int]] = {}      # not yet admitted id -> [occurrences, last seen]
        self._evicted: list[tuple[str, int]] = []
        self._assigned: list[int] = []              # rows handed to an id since the last drain_assigned
        self._live: np.ndarray | None = None
        self.evictions = 0

    # ---- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of admitted ids (rows in use, the fallback row not counted)."""
        return len(self.rows)

    @property
    def high(self) -> int:
        """Rows 0..high-1 have been handed out at some point (the embedding table needs this many)."""
        return len(self.ids)

    def get(self, key: str) -> int | None:
        return self.rows.get(key)

    def find(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of ``keys`` as :meth:`get` gives them, 0 for ids without a row of their own (one dict lookup
        each in C: a delta of another replica names ~1,000 items).

        >>> t = IdTable(4); _ = t.lookup("a", 0, 0); t.find(["a", "zz", "a"]).tolist(), t.find([]).dtype
        ([1, 0, 1], dtype('int64'))
        """
        return np.fromiter(map(self.rows.get, keys, repeat(self.FALLBACK)), np.int64, len(keys))

    def live_rows(self) -> np.ndarray:
        """Rows that hold an admitted id, ascending (cached until the table changes)."""
        if self._live is None:
            self._live = np.asarray(sorted(self.rows.values()), np.int32)
        return self._live

    # ---- writing ---------------------------------------------------------------------------------
    def lookup(self, key: str, ts: int, step: int, count: int = 1, protect_from: int | None = None) -> int:
        """The row of ``key`` (admitting it when due), recording ``count`` occurrences at event time ``ts``.

        ``protect_from``: rows used at model steps >= this are never evicted (the current call's rows).
        """
        row = self.rows.get(key)
        if row is None:
            seen = self.pending.get(key, (0,))[0] + count
            if seen < self.admit_after:
                return self._count_pending(key, seen, ts)
            row = self._allocate(step if protect_from is None else protect_from)
            if row == self.FALLBACK:  # every row is in use by the current call: try again next time
                return self._count_pending(key, seen, ts) if self.admit_after > 1 else row
            self.pending.pop(key, None)
            self.ids[row], self.rows[key] = key, row
            self.born[row] = step
            self._assigned.append(row)
            self._live = None
        if ts > self.last_seen[row]:
            self.last_seen[row] = ts
        self.last_step[row] = step
        return row

    def _count_pending(self, key: str, seen: int, ts: int) -> int:
        self.pending[key] = [seen, ts]
        if len(self.pending) > self.capacity:
            self._forget_stalest_pending()
        return self.FALLBACK

    def expire(self, now: int, horizon: int) -> list[str]:
        """Free the rows of ids not seen since ``now - horizon``; forget stale pending counts too."""
        cutoff = now - horizon
        stale = [r for r in self.rows.values() if self.last_seen[r] < cutoff]
        for key in [k for k, (_, seen) in self.pending.items() if seen < cutoff]:
            del self.pending[key]
            self._evicted.append((key, self.FALLBACK))
        return self._evict(stale)

    def drain_evicted(self) -> list[tuple[str, int]]:
        """(id, row) of ids that lost their row since the last call (row 0: a forgotten pending id)."""
        out, self._evicted = self._evicted, []
        return out

    def drain_assigned(self) -> list[int]:
        """Rows handed to an id since the last call (new rows, and rows freed by an eviction), in order; a row
        can appear twice when it was freed and handed out again in between."""
        out, self._assigned = self._assigned, []
        return out

    def _allocate(self, protect_from: int) -> int:
        if not self.free and len(self.rows) >= self.capacity:
            candidates = np.asarray([r for r in self.rows.values() if self.last_step[r] < protect_from], np.int64)
            if len(candidates):
                n = min(len(candidates), max(1, self.capacity // 64))
                order = np.argpartition(self.last_seen[candidates], n - 1)[:n] if n < len(candidates) else slice(None)
                self._evict(sorted(int(r) for r in candidates[order]))
        if self.free:
            return self.free.pop()
        if len(self.rows) >= self.capacity:
            return self.FALLBACK  # every row is in use by the current call
        row = len(self.ids)
        self.ids.append(None)
        for name, fill in (("last_seen", 0), ("last_step", -1), ("born", NEVER)):
            arr = getattr(self, name)
            if row >= len(arr):
                setattr(self, name, np.concatenate([arr, np.full(len(arr), fill, np.int64)]))
        return row

    def _evict(self, rows: list[int]) -> list[str]:
        keys = []
        for r in rows:
            key = self.ids[r]
            del self.rows[key]
            self.ids[r] = None
            self.born[r] = NEVER
            self.free.append(r)
            keys.append(key)
        if keys:
            self.free.sort(reverse=True)  # hand out low rows first: deterministic
            self._live = None
            self.evictions += len(keys)
            self._evicted.extend(zip(keys, rows))
        return keys

    def _forget_stalest_pending(self) -> None:
        by_age = sorted(self.pending.items(), key=lambda kv: kv[1][1])
        for key, _ in by_age[: len(by_age) // 2]:
            del self.pending[key]
            self._evicted.append((key, self.FALLBACK))

    # ---- persistence -----------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, np.ndarray]:
        n = self.high
        pend = sorted(self.pending.items())
        return {f"{prefix}_ids": np.asarray([k or "" for k in self.ids], dtype=object).astype(str),
                f"{prefix}_admitted": np.asarray([k is not None for k in self.ids], bool),
                f"{prefix}_last_seen": self.last_seen[:n], f"{prefix}_last_step": self.last_step[:n],
                f"{prefix}_born": self.born[:n], f"{prefix}_free": np.asarray(self.free, np.int64),
                f"{prefix}_pending_ids": np.asarray([k for k, _ in pend], dtype=object).astype(str),
                f"{prefix}_pending": np.asarray([v for _, v in pend], np.int64).reshape(-1, 2),
                f"{prefix}_evictions": np.int64(self.evictions)}

    @classmethod
    def from_state(cls, z, prefix: str, capacity: int, admit_after: int) -> "IdTable":
        t = cls(capacity, admit_after)
        t.ids = [str(k) if ok else None for k, ok in zip(z[f"{prefix}_ids"], z[f"{prefix}_admitted"])]
        t.rows = {k: r for r, k in enumerate(t.ids) if k is not None}
        t.last_seen = np.array(z[f"{prefix}_last_seen"], np.int64)
        t.last_step = np.array(z[f"{prefix}_last_step"], np.int64)
        t.born = np.array(z[f"{prefix}_born"], np.int64)
        t.free = [int(r) for r in z[f"{prefix}_free"]]
        t.pending = {str(k): [int(c), int(s)] for k, (c, s) in zip(z[f"{prefix}_pending_ids"], z[f"{prefix}_pending"])}
        t.evictions = int(z[f"{prefix}_evictions"])
        return t
