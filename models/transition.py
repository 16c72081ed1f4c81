"""Item-to-item transitions: counts of which items followed a user's recent items, mixed with popularity.

A strong streaming baseline for a sequence-aware model (and the count-based model of issue 14): when
a user's new increment arrives, every item of it is counted as following each item of the user's
recent history (:class:`~freshet.models.history.UserHistory`: the last ``model.history`` items,
weighted by behaviour weight and ``model.history_decay ** age`` in increments). A user's list scores
item ``i`` as

    sum_j a_j * (T[h_j, i] + s * T[i, h_j]) / (n_j + 1) ** transition_alpha  /  sum_j a_j
        +  transition_popularity * pop_i

where ``T[h, i]`` is the decayed count of ``i`` following ``h`` (``s = model.transition_symmetric`` adds
the counts of ``h_j`` following ``i``: co-occurrence in either order), ``n_j`` how much ``h_j`` was followed by
anything (``alpha`` between 0, raw counts, and 1, conditional frequencies) and ``pop_i`` the item's share of
all weight (:class:`~freshet.models.popularity.Popularity`, with its half-life). Users with no history
get the popularity list. Updated online, once per increment; nothing is learned by gradient.

The counts are a dense ``[items, items]`` matrix (float32): ``model.transition_max_items`` rows at most
(4,096 items: 64 MiB; the default 8,192: 256 MiB). Items beyond it are still counted for popularity and
listed by it, but have no transitions. Right for catalogues of thousands (MovieLens); a baseline, not
a model for millions of items.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = Transition(ModelConfig(kind="transition", history=2))
>>> for user in ("u1", "u2"):
...     _ = m.learn_many([Increment(user, 60, ("a",), (1.0,), (1,), 1)])
...     _ = m.learn_many([Increment(user, 120, ("b",), (1.0,), (1,), 1)])
>>> _ = m.learn_many([Increment("u3", 180, ("a",), (1.0,), (1,), 1), Increment("u3", 180, ("c",), (1.0,), (1,), 1)])
>>> m.recommend(["u3", "new"], k=2)[0].items    # u3 just had "a": "b" followed "a" twice
['b']
>>> m.recommend(["new"], k=3)[0].items          # no history: popularity
['a', 'b', 'c']
"""
from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, Recommender, StepStats, pack_dense, top_k_lists, unpack_dense
from freshet.models.history import UserHistory
from freshet.models.increments import Increment
from freshet.models.popularity import Popularity


class TransitionCounts:
    """The counted transitions, shared by the `transition` baseline and the sequence model's memory.

    ``counts[h, i]`` holds ``T[h, i] + symmetric * T[i, h]`` (``T[h, i]``: the weight of item row ``i``
    following row ``h``), so a context's scores for every item are one weighted sum of contiguous rows,
    ``a @ counts[h]``, instead of rows plus strided columns (2.4x less time for the sequence model's
    memory on ML-1M); ``out[h]`` is ``T``'s row sums. ``symmetric`` is folded in: :meth:`load` converts
    counts saved with another value.

    Dense over the first ``size`` item rows, which grows by doubling up to ``bound`` (rows beyond are not
    counted and score nothing).

    >>> t = TransitionCounts(size=2, bound=4, alpha=0.0, symmetric=0.0)
    >>> t.grow(3)                      # room for row 2 (callers grow as their tables do)
    >>> t.count(np.array([0, 1]), np.array([1.0, 0.5]), np.array([2]), np.array([2.0]))
    >>> t.size, t.counts[:, 2].tolist(), t.out.tolist()
    (4, [2.0, 1.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0])
    >>> t.feature(np.array([0, 1]), np.array([1.0, 1.0]), np.array([2, 3])).tolist()   # (2 + 1) / 2
    [1.5, 0.0]
    """

    def __init__(self, size: int, bound: int, alpha: float, symmetric: float):
        self.bound, self.alpha, self.symmetric = bound, alpha, symmetric
        size = min(size, bound)
        self.counts = np.zeros((size, size), np.float32)
        self.out = np.zeros(size, np.float32)

    @property
    def size(self) -> int:
        return len(self.out)

    @classmethod
    def of(cls, counts: np.ndarray, out: np.ndarray, bound: int, alpha: float, symmetric: float) -> "TransitionCounts":
        """Counts held elsewhere (e.g. a model's device copy) as this class, for its state and its row updates."""
        t = cls(0, bound, alpha, symmetric)
        t.counts, t.out = counts, out
        return t

    @staticmethod
    def grown_size(m: int, n: int, bound: int) -> int:
        """The size for rows ``0..n-1`` from size ``m``: doubling, at most ``bound``.

        >>> TransitionCounts.grown_size(4, 5, 100), TransitionCounts.grown_size(4, 3, 100), TransitionCounts.grown_size(64, 65, 100)
        (8, 4, 100)
        """
        if n <= m or m >= bound:
            return m
        new = max(m, 1)
        while new < n:
            new *= 2
        return min(new, bound)

    def grow(self, n: int) -> None:
        """Room for rows ``0..n-1`` (doubling, at most ``bound``)."""
        m, new = self.size, self.grown_size(self.size, n, self.bound)
        if new == m:
            return
        self.counts = np.pad(self.counts, [(0, new - m), (0, new - m)])
        self.out = np.pad(self.out, [(0, new - m)])

    def count(self, rows: np.ndarray, weights: np.ndarray, items: np.ndarray, item_weights: np.ndarray) -> None:
        """``items`` (with ``item_weights``) followed the context ``rows`` (with ``weights``)."""
        m = self.size
        if not m:
            return
        add = (weights[:, None] * item_weights[None, :] * ((rows < m)[:, None] & (items < m)[None, :])).astype(np.float32)
        h, i = np.minimum(rows, m - 1)[:, None], np.minimum(items, m - 1)[None, :]
        np.add.at(self.counts, (h, i), add)
        if self.symmetric:
            np.add.at(self.counts, (i, h), np.float32(self.symmetric) * add)
        np.add.at(self.out, h[:, 0], add.sum(1))

    def feature(self, rows: np.ndarray, weights: np.ndarray, cand: np.ndarray | None = None) -> np.ndarray:
        """For one context: ``sum_j a_j (counts[h_j, c] + symmetric * counts[c, h_j])`` per candidate row ``c``
        (every counted row when ``cand`` is None), ``a_j`` = the row's share of the context's weight over
        ``(out[h_j] + 1) ** alpha``; 0 for rows beyond the counts."""
        m = self.size
        if not m:
            return np.zeros(m if cand is None else len(cand), np.float32)
        h = np.minimum(rows, m - 1)
        a = weights / max(float(weights.sum()), 1e-9) * (rows < m) * (self.out[h] + 1.0) ** -self.alpha
        f = a.astype(np.float32) @ self.counts[h]
        if cand is None:
            return f
        return f[np.minimum(cand, m - 1)] * (cand < m)

    def zero(self, rows) -> None:
        """Rows handed to new items start with no transitions either way."""
        rows = [r for r in rows if r < self.size]
        self.counts[rows, :] = 0.0
        self.counts[:, rows] = 0.0
        self.out[rows] = 0.0

    def state(self, name: str = "transitions") -> dict[str, np.ndarray]:
        return {**pack_dense(self.counts, name), f"{name}_out": self.out,
                f"{name}_symmetric": np.float64(self.symmetric)}

    def load(self, z, name: str = "transitions") -> None:
        """The counts of :meth:`state` (cut to this object's size, grown to theirs up to ``bound``), converted
        when they were saved with another ``symmetric`` (a state without it holds plain ``T``).

        >>> a = TransitionCounts(2, 2, 0.0, symmetric=0.5); a.count(np.array([0]), np.array([1.0]), np.array([1]), np.array([1.0]))
        >>> b = TransitionCounts(2, 2, 0.0, symmetric=0.0); b.load(a.state()); b.counts.tolist()
        [[0.0, 1.0], [0.0, 0.0]]
        """
        counts = unpack_dense(z, name)
        saved = float(z[f"{name}_symmetric"]) if f"{name}_symmetric" in z else 0.0
        if saved != self.symmetric:
            if saved >= 1.0:
                raise ValueError(f"counts saved with transition_symmetric {saved} cannot be converted to "
                                 f"{self.symmetric}: keep transition_symmetric: {saved}")
            plain = (counts - saved * counts.T) / (1.0 - saved * saved)
            counts = (plain + self.symmetric * plain.T).astype(np.float32)
        self.grow(len(counts))
        m = min(len(counts), self.size)
        self.counts[:m, :m] = counts[:m, :m]
        self.out[:m] = z[f"{name}_out"][:m]


class Transition(Recommender):
    """Counted item-to-item transitions from a user's recent items, plus (recency-weighted) popularity."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.pop = Popularity(cfg)            # item ids, popularity counts and the seen-item filter
        self.history = UserHistory(cfg.history, cfg.history_decay)
        self.transitions = TransitionCounts(cfg.initial_capacity, cfg.transition_max_items, cfg.transition_alpha,
                                            cfg.transition_symmetric)
        self.version = 0

    n_users = property(lambda self: len(self.history))
    n_items = property(lambda self: self.pop.n_items)
    T = property(lambda self: self.transitions.counts)

    def observe(self, batch: Sequence[Increment]) -> None:
        """Frozen: seen items grow, nothing else."""
        self.pop.observe(batch)

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        started = time.perf_counter()
        stats = self.pop.learn_many(batch)
        self.transitions.grow(self.pop.n_items)
        for inc in batch:
            rows = np.asarray([self.pop.items.rows[i] for i in inc.items], np.int32)
            weights = np.asarray(inc.weights, np.float32)
            positive = weights > 0
            if not positive.any():
                continue
            ctx_rows, ctx_w = self.history.context(inc.user_id)
            if ctx_w.any():
                self.transitions.count(ctx_rows, ctx_w, rows[positive], weights[positive])
            self.history.append(inc.user_id, rows[positive], weights[positive])
        if stats.pairs:
            self.version += 1
        return StepStats(0.0, stats.pairs, time.perf_counter() - started)

    def scores(self, users: Sequence[str]) -> np.ndarray:
        """``[users, items]``: each user's transition score plus the popularity mix."""
        counts = self.pop.current_counts()
        total = counts.sum()
        out = np.tile(self.cfg.transition_popularity * (counts / total if total > 0 else counts), (len(users), 1))
        m = min(self.pop.n_items, self.transitions.size)
        for j, user in enumerate(users):
            if user in self.history:
                out[j, :m] += self.transitions.feature(*self.history.context(user))[:m]
        return out

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        if not users or self.pop.n_items == 0:
            return [Recommendation([], []) for _ in users]
        return top_k_lists(self.scores(users), users, k, self.pop.seen, self.pop.items.ids, exclude_seen)

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"pop_{k}": v for k, v in self.pop.state().items()}, **self.history.state(),
                **self.transitions.state(), "version": np.int64(self.version),
                "config": np.frombuffer(json.dumps(self.cfg.__dict__).encode(), np.uint8)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "Transition":
        model = cls(cfg)
        model.pop = Popularity.from_state({k[4:]: z[k] for k in z if k.startswith("pop_")}, cfg)
        model.history = UserHistory.from_state(z, cfg.history, cfg.history_decay)
        model.transitions.load(z)
        model.version = int(z["version"])
        return model
