"""Each user's recent behaviour: the items of their last increments, newest first, bounded per user.

What a sequence-aware recommender needs to know about a user is not who they are but what they just
did. :class:`UserHistory` keeps, per user, at most ``length`` items (item rows of the model's table)
with their weights and the increment they came from, and hands out a fixed-width context: the last
``length`` rows, each weighted by its behaviour weight times ``decay ** age``, where ``age`` counts the
user's increments since (0 for the newest window of the user). Fixed width, so a batch of contexts is
one dense ``[users, length]`` array (padding: row 0 with weight 0).

>>> h = UserHistory(length=3, decay=0.5)
>>> h.append("u", [4, 5], [1.0, 2.0]); h.append("u", [6], [1.0])
>>> rows, weights = h.context("u"); rows.tolist(), weights.tolist()
([6, 4, 5], [1.0, 0.5, 1.0])
>>> h.append("u", [7, 8], [1.0, 1.0]); h.context("u")[0].tolist()   # the oldest fall out
[7, 8, 6]
>>> h.context("stranger")[1].tolist()
[0.0, 0.0, 0.0]
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

CONTEXTS_KEPT = 1 << 16      # users whose context is kept between asks (a bound on memory, ~25 MB at length 20)


class UserHistory:
    """Per user: the last ``length`` item rows, weights and increment numbers (newest first)."""

    def __init__(self, length: int, decay: float):
        if length < 1 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"history length must be >= 1 and decay in [0, 1], got {length}, {decay}")
        self.length, self.decay = length, decay
        # user -> (rows int32 [<=length], weights float32, increment number int64 per row), newest first;
        # plus the user's increment counter
        self._rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._count: dict[str, int] = {}
        # user -> their context as :meth:`context` returns it (read-only), until their history changes: a user's
        # context is asked for before each increment (the pairs) and after it (the list), and the one after is
        # the next one's before. At most CONTEXTS_KEPT users' (emptied when full: a few hundred bytes per user)
        self._ctx: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._empty = self._frozen(np.zeros(length, np.int32), np.zeros(length, np.float32))

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, user: str) -> bool:
        return user in self._rows

    def append(self, user: str, rows: Sequence[int], weights: Sequence[float]) -> None:
        """A new increment of ``user``: its item rows (heaviest first) and their weights."""
        n = self._count.get(user, 0)
        self._count[user] = n + 1
        self._ctx.pop(user, None)
        new_r = np.asarray(rows, np.int32)[: self.length]
        new_w = np.asarray(weights, np.float32)[: self.length]
        old = self._rows.get(user)
        if old is None:
            self._rows[user] = (new_r, new_w, np.full(len(new_r), n, np.int64))
            return
        keep = self.length - len(new_r)
        self._rows[user] = (np.concatenate([new_r, old[0][:keep]]), np.concatenate([new_w, old[1][:keep]]),
                            np.concatenate([np.full(len(new_r), n, np.int64), old[2][:keep]]))

    def context(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows int32 [length], weights float32 [length]): the user's recent items, decayed; zeros when unknown.
        The arrays are read-only (kept until the user's history changes)."""
        ctx = self._ctx.get(user)
        if ctx is not None:
            return ctx
        entry = self._rows.get(user)
        if entry is None:
            return self._empty
        rows, weights = np.zeros(self.length, np.int32), np.zeros(self.length, np.float32)
        r, w, inc = entry
        age = self._count[user] - 1 - inc
        rows[: len(r)] = r
        weights[: len(r)] = w * np.power(np.float32(self.decay), age.astype(np.float32))
        if len(self._ctx) >= CONTEXTS_KEPT:
            self._ctx.clear()
        ctx = self._ctx[user] = self._frozen(rows, weights)
        return ctx

    @staticmethod
    def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        for a in arrays:
            a.setflags(write=False)
        return arrays

    def contexts(self, users: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """The contexts of several users, stacked: ``[n, length]`` rows and weights."""
        pairs = [self.context(u) for u in users]
        if not pairs:
            return np.zeros((0, self.length), np.int32), np.zeros((0, self.length), np.float32)
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def forget(self, user: str) -> None:
        self._rows.pop(user, None)
        self._count.pop(user, None)
        self._ctx.pop(user, None)

    def drop_rows(self, gone: set[int]) -> None:
        """Item rows that were freed (evicted items): their entries leave every history."""
        if not gone:
            return
        gone_arr = np.fromiter(gone, np.int32, len(gone))
        for user, (r, w, inc) in list(self._rows.items()):
            keep = ~np.isin(r, gone_arr)
            if not keep.all():
                self._rows[user] = (r[keep], w[keep], inc[keep])
                self._ctx.pop(user, None)

    # ---- persistence: flat arrays, no pickles ---------------------------------------------------
    def state(self, prefix: str = "history") -> dict[str, np.ndarray]:
        users = sorted(self._rows)
        parts = [self._rows[u] for u in users]
        return {f"{prefix}_users": np.asarray(users, dtype=object).astype(str),
                f"{prefix}_count": np.asarray([self._count[u] for u in users], np.int64),
                f"{prefix}_ptr": np.cumsum([0] + [len(p[0]) for p in parts]).astype(np.int64),
                f"{prefix}_rows": np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32),
                f"{prefix}_weights": np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32),
                f"{prefix}_inc": np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)}

    @classmethod
    def from_state(cls, z: Mapping[str, np.ndarray], length: int, decay: float,
                   prefix: str = "history") -> "UserHistory":
        h = cls(length, decay)
        ptr = z[f"{prefix}_ptr"]
        for j, user in enumerate(z[f"{prefix}_users"]):
            a, b = int(ptr[j]), int(ptr[j + 1])
            b = min(b, a + length)   # a shorter history setting keeps the newest rows
            h._rows[str(user)] = (np.array(z[f"{prefix}_rows"][a:b], np.int32),
                                  np.array(z[f"{prefix}_weights"][a:b], np.float32),
                                  np.array(z[f"{prefix}_inc"][a:b], np.int64))
            h._count[str(user)] = int(z[f"{prefix}_count"][j])
        return h
