"""Popularity, cumulative or recency-weighted: the baselines every recommender has to beat (CONTRACTS §3).

Items are ranked by their summed positive weight so far; with ``model.popularity_half_life_ms > 0``
each weight counts ``2 ** (-age / half_life)``, its age taken in event time (``window_end``), so the
list follows what is popular *now*. The same seen-item filter and the same window cadence as the online
model apply, because it runs in the same job.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = Popularity(ModelConfig())
>>> _ = m.learn_many([Increment("u1", 60, ("a", "b"), (1.0, 3.0), (1, 1), 2),
...                   Increment("u2", 60, ("b", "c"), (1.0, 1.0), (1, 1), 2)])
>>> m.recommend(["u1", "new"], k=2)
[Recommendation(items=['c'], scores=[1.0]), Recommendation(items=['b', 'a'], scores=[4.0, 1.0])]

With a half-life of one minute, three views two minutes ago weigh less than one now:

>>> m = Popularity(ModelConfig(kind="recent-popularity", popularity_half_life_ms=60_000))
>>> _ = m.learn_many([Increment("u1", 60_000, ("old",), (3.0,), (3,), 3)])
>>> _ = m.learn_many([Increment("u2", 180_000, ("new",), (1.0,), (1,), 1)])
>>> m.recommend(["u3"], k=2)
[Recommendation(items=['new', 'old'], scores=[1.0, 0.75])]
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, Recommender, StepStats, pack_seen, unpack_seen
from freshet.models.increments import Increment
from freshet.models.id_table import IdIndex

# Decayed counts are kept scaled by 2 ** ((t_ref - t0) / half_life) and rescaled when the exponent
# passes this, so a weight costs O(1) however many items there are (no per-window decay of every count).
_MAX_EXPONENT = 60.0


class Popularity(Recommender):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.items = IdIndex()
        self.counts = np.zeros(cfg.initial_capacity, np.float64)
        self.seen: dict[str, set[int]] = {}
        self.version = 0
        self.t_ref = None     # event time at which the stored counts are unscaled (half-life only)
        self.now = 0          # newest event time learned

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

    def _scale(self, t: int) -> float:
        """The factor a weight at event time ``t`` is stored with (1 without a half-life)."""
        half_life = self.cfg.popularity_half_life_ms
        if half_life <= 0:
            return 1.0
        if self.t_ref is None:
            self.t_ref = t
        exponent = (t - self.t_ref) / half_life
        if exponent > _MAX_EXPONENT:      # rescale everything to t
            self.counts *= 2.0 ** -exponent
            self.t_ref, exponent = t, 0.0
        return 2.0 ** exponent

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        started = time.perf_counter()
        self.observe(batch)
        pairs = 0
        for inc in batch:
            scale = self._scale(inc.window_end)
            self.now = max(self.now, inc.window_end)
            for item, weight in zip(inc.items, inc.weights):
                if weight > 0:
                    self.counts[self.items.rows[item]] += weight * scale
                    pairs += 1
        if pairs:
            self.version += 1
        return StepStats(0.0, pairs, time.perf_counter() - started)

    def current_counts(self) -> np.ndarray:
        """Each item's (decayed) weight as of the newest event time learned."""
        counts = self.counts[: len(self.items)]
        if self.cfg.popularity_half_life_ms > 0 and self.t_ref is not None:
            counts = counts * 2.0 ** (-(self.now - self.t_ref) / self.cfg.popularity_half_life_ms)
        return counts

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        counts = self.current_counts()
        order = np.argsort(-counts, kind="stable")
        out = []
        for user in users:
            skip = self.seen.get(user, set()) if exclude_seen else set()
            top = [i for i in order[: k + len(skip)] if i not in skip][:k]
            out.append(Recommendation([self.items.ids[i] for i in top], [float(counts[i]) for i in top]))
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"item_ids": np.asarray(self.items.ids, dtype=object).astype(str),
                "counts": self.counts[: len(self.items)], "version": np.int64(self.version),
                "times": np.asarray([-1 if self.t_ref is None else self.t_ref, self.now], np.int64),
                **pack_seen(self.seen)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "Popularity":
        model = cls(cfg)
        model.items = IdIndex([str(x) for x in z["item_ids"]])
        model.counts = np.concatenate([z["counts"], np.zeros(max(cfg.initial_capacity, len(z["counts"])))])
        model.version = int(z["version"])
        if "times" in z:
            t_ref, model.now = (int(x) for x in z["times"])
            model.t_ref = None if t_ref < 0 else t_ref
        model.seen = unpack_seen(z)
        return model
