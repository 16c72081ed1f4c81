"""Echo: a no-op scorer for benchmarks. It learns nothing and lists each user's own window items.

``freshet bench`` runs the full job with ``model.kind = echo`` to price the plumbing (the JVM -> Python
boundary, state, sinks) apart from the model. Not a recommender anyone should serve.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = Echo(ModelConfig(kind="echo"))
>>> _ = m.learn_many([Increment("u1", 60, ("a", "b"), (3.0, 1.0), (1, 1), 2)])
>>> m.recommend(["u1", "new"], k=1)
[Recommendation(items=['a'], scores=[3.0]), Recommendation(items=[], scores=[])]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, Recommender, StepStats
from freshet.models.increments import Increment


class Echo(Recommender):
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.last: dict[str, Recommendation] = {}
        self.version = 0

    n_users = property(lambda self: len(self.last))
    n_items = property(lambda self: 0)

    def observe(self, batch: Sequence[Increment]) -> None:
        for inc in batch:   # increments keep their heaviest items first
            self.last[inc.user_id] = Recommendation(list(inc.items), list(inc.weights))

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        self.observe(batch)
        return StepStats(0.0, 0, 0.0)

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        out = []
        for user in users:
            rec = self.last.pop(user, Recommendation([], []))
            out.append(Recommendation(rec.items[:k], rec.scores[:k]))
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"version": np.int64(self.version)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "Echo":
        model = cls(cfg)
        model.version = int(z["version"])
        return model
