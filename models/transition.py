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
from freshet.models.base import Recommendation, Recommender, StepStats
from freshet.models.history import UserHistory
from freshet.models.increments import Increment
from freshet.models.popularity import Popularity


class Transition(Recommender):
    """Counted item-to-item transitions from a user's recent items, plus (recency-weighted) popularity."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.pop = Popularity(cfg)            # item ids, popularity counts and the seen-item filter
        self.history = UserHistory(cfg.history, cfg.history_decay)
        cap = min(cfg.initial_capacity, cfg.transition_max_items)
        self.T = np.zeros((cap, cap), np.float32)     # T[h, i]: weight of i following h
        self.out = np.zeros(cap, np.float32)          # sum_i T[h, i]
        self.version = 0

    n_users = property(lambda self: len(self.history))
    n_items = property(lambda self: self.pop.n_items)

    def _grow(self, n: int) -> None:
        cap = len(self.out)
        if n <= cap or cap >= self.cfg.transition_max_items:
            return
        new = cap
        while new < n:
            new *= 2
        new = min(new, self.cfg.transition_max_items)
        T = np.zeros((new, new), np.float32)
        T[:cap, :cap] = self.T
        self.T, self.out = T, np.concatenate([self.out, np.zeros(new - cap, np.float32)])

    def observe(self, batch: Sequence[Increment]) -> None:
        """Frozen: seen items grow, nothing else."""
        self.pop.observe(batch)

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        started = time.perf_counter()
        stats = self.pop.learn_many(batch)
        self._grow(self.pop.n_items)
        cap = len(self.out)
        for inc in batch:
            rows = np.asarray([self.pop.items.rows[i] for i in inc.items], np.int32)
            weights = np.asarray(inc.weights, np.float32)
            ctx_rows, ctx_w = self.history.context(inc.user_id)
            positive = weights > 0
            ok = (ctx_w > 0) & (ctx_rows < cap)
            if ok.any() and positive.any():
                to, w = rows[positive & (rows < cap)], weights[positive & (rows < cap)]
                np.add.at(self.T, (ctx_rows[ok][:, None], to[None, :]), ctx_w[ok][:, None] * w[None, :])
                np.add.at(self.out, ctx_rows[ok], ctx_w[ok] * w.sum())
            if positive.any():
                self.history.append(inc.user_id, rows[positive], weights[positive])
        if stats.pairs:
            self.version += 1
        return StepStats(0.0, stats.pairs, time.perf_counter() - started)

    def scores(self, users: Sequence[str]) -> np.ndarray:
        """``[users, items]``: each user's transition score plus the popularity mix."""
        n, cap = self.pop.n_items, len(self.out)
        counts = self.pop.current_counts()
        total = counts.sum()
        pop = self.cfg.transition_popularity * (counts / total if total > 0 else counts)
        rows, weights = self.history.contexts(users)
        weights = np.where(rows < cap, weights, 0.0)
        rows = np.minimum(rows, cap - 1)
        m = min(n, cap)
        norm = (self.out[rows] + 1.0) ** self.cfg.transition_alpha           # [U, L]
        a = weights / np.maximum(weights.sum(1, keepdims=True), 1e-12) / norm
        out = np.tile(pop, (len(users), 1))
        counts = self.T[rows, :m]                                           # [U, L, m]
        if self.cfg.transition_symmetric > 0:
            counts = counts + self.cfg.transition_symmetric * self.T[:m, rows].transpose(1, 2, 0)
        out[:, :m] += np.einsum("ul,uln->un", a, counts)
        return out

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        if not users or self.pop.n_items == 0:
            return [Recommendation([], []) for _ in users]
        return self.pop.top_k(self.scores(users), users, k, exclude_seen)

    def state(self) -> dict[str, np.ndarray]:
        m = min(self.pop.n_items, len(self.out))
        return {**{f"pop_{k}": v for k, v in self.pop.state().items()}, **self.history.state(),
                "transitions": self.T[:m, :m], "transition_out": self.out[:m], "version": np.int64(self.version),
                "config": np.frombuffer(json.dumps(self.cfg.__dict__).encode(), np.uint8)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "Transition":
        model = cls(cfg)
        model.pop = Popularity.from_state({k[4:]: z[k] for k in z if k.startswith("pop_")}, cfg)
        model.history = UserHistory.from_state(z, cfg.history, cfg.history_decay)
        m = len(z["transition_out"])
        model._grow(m)
        m = min(m, len(model.out))
        model.T[:m, :m] = z["transitions"][:m, :m]
        model.out[:m] = z["transition_out"][:m]
        model.version = int(z["version"])
        return model

