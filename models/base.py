"""The small interface every Freshet recommender honours (in the spirit of River's ``learn_many``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple, Sequence

from freshet.models.increments import Increment


class Recommendation(NamedTuple):
    items: list[str]      # distinct item ids, best first
    scores: list[float]   # non-increasing


class StepStats(NamedTuple):
    loss: float
    pairs: int          # positive (user, item) pairs trained on
    seconds: float      # wall time of the optimizer step


class Recommender(ABC):
    """Learns from micro-batches of increments and recommends top-K items per user."""

    #: increases with every model update (optimizer step)
    version: int = 0

    @abstractmethod
    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        """One model update on a micro-batch of increments."""

    @abstractmethod
    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        """Top-``k`` items for each user, over the whole catalogue known so far."""

    @abstractmethod
    def save(self, path: Path) -> Path:
        """Write the model's full state to ``path`` (a readable ``.npz``, not a pickle)."""
