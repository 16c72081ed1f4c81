"""Cumulative popularity: the baseline every recommender has to beat (CONTRACTS §3).

Items are ranked by their summed positive weight so far; the same seen-item filter and the same
window cadence as the online model apply, because it runs in the same job.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = Popularity(ModelConfig())
>>> _ = m.learn_many([Increment("u1", 60, ("a", "b"), (1.0, 3.0), (1, 1), 2),
...                   Increment("u2", 60, ("b", "c"), (1.0, 1.0), (1, 1), 2)])
>>> m.recommend(["u1", "new"], k=2)
[Recommendation(items=['c'], scores=[1.0]), Recommendation(items=['b', 'a'], scores=[4.0, 1.0])]
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, Recommender, StepStats, pack_seen, unpack_seen
from freshet.models.increments import Increment
from freshet.models.id_table import IdIndex


class Popularity(Recommender):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.items = IdIndex()
        self.counts = np.zeros(cfg.initial_capacity, np.float64)
        self.seen: dict[str, set[int]] = {}
        self.version = 0

    @property
    def n_users(self) -> int:
        return len(self.seen)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def observe(self, batch: Sequence[Increment]) -> None:
        for inc in batch:
            seen = self.seen.setdefault(inc.user_id, set())
            seen.update(self.items.add(item) for item in inc.items)
        if len(self.items) > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(max(len(self.items), 2 * len(self.counts))
                                                                - len(self.counts))])

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        started = time.perf_counter()
        self.observe(batch)
        pairs = 0
        for inc in batch:
            for item, weight in zip(inc.items, inc.weights):
                if weight > 0:
                    self.counts[self.items.rows[item]] += weight
                    pairs += 1
        if pairs:
            self.version += 1
        return StepStats(0.0, pairs, time.perf_counter() - started)

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        n = len(self.items)
        counts = self.counts[:n]
        order = np.argsort(-counts, kind="stable")
        out = []
        for user in users:
            skip = self.seen.get(user, set()) if exclude_seen else set()
            top = [i for i in order[: k + len(skip)] if i not in skip][:k]
            out.append(Recommendation([self.items.ids[i] for i in top], [float(counts[i]) for i in top]))
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"item_ids": np.asarray(self.items.ids, dtype=object).astype(str),
                "counts": self.counts[: len(self.items)], "version": np.int64(self.version), **pack_seen(self.seen)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "Popularity":
        model = cls(cfg)
        model.items = IdIndex([str(x) for x in z["item_ids"]])
        model.counts = np.concatenate([z["counts"], np.zeros(max(cfg.initial_capacity, len(z["counts"])))])
        model.version = int(z["version"])
        model.seen = unpack_seen(z)
        return model
