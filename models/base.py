"""The small interface every Freshet recommender honours (in the spirit of River's ``learn_many``)."""
from __future__ import annotations

import io
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from freshet.models.increments import Increment


class Recommendation(NamedTuple):
    items: list[str]      # distinct item ids, best first
    scores: list[float]   # non-increasing


class StepStats(NamedTuple):
    loss: float
    pairs: int          # positive (user, item) pairs trained on
    seconds: float      # wall time of the optimizer step


class WindowList(NamedTuple):
    """The list a user gets when a window closes, and the model version it was made with."""
    user_id: str
    window_end: int
    rec: Recommendation
    model_version: int

    def to_json(self, emitted_at: int) -> str:
        """The recommendation record of CONTRACTS §2, as ``json.dumps(..., ensure_ascii=False)`` writes it,
        built without a dict per list (the job writes one per active user and window).

        >>> WindowList("u1", 60000, Recommendation(["é", "b"], [0.5, 0.25]), 3).to_json(61234)
        '{"user_id": "u1", "items": ["é", "b"], "scores": [0.5, 0.25], "window_end": 60000, "model_version": 3, "emitted_at": 61234}'
        """
        rec = self.rec
        return (f'{{"user_id": {_json_str(self.user_id)}, "items": [{", ".join(map(_json_str, rec.items))}], '
                f'"scores": {_json_floats(rec.scores)}, '
                f'"window_end": {int(self.window_end)}, "model_version": {int(self.model_version)}, '
                f'"emitted_at": {int(emitted_at)}}}')


_json_str = json.encoder.encode_basestring      # what json.dumps(ensure_ascii=False) does to a str (C code)


def _json_floats(values: Sequence[float]) -> str:
    """A JSON array of numbers: a list's repr (C code, the same digits as json.dumps) when all are finite."""
    values = [float(x) for x in values]
    return repr(values) if all(map(math.isfinite, values)) else json.dumps(values)


def micro_batches(increments: Sequence[Increment], batch_size: int) -> list[Sequence[Increment]]:
    """Consecutive chunks of at most ``batch_size`` (one empty chunk for an empty window)."""
    return [increments[j:j + batch_size] for j in range(0, len(increments), batch_size)] or [increments]


def top_k_lists(scores: np.ndarray, users: Sequence[str], k: int, seen: Mapping[str, set[int]], ids: Sequence[str],
                exclude_seen: bool = True) -> list[Recommendation]:
    """Each user's best ``k`` of ``scores`` (``[users, item rows]``, changed in place; -inf: not listable),
    their ``seen`` rows left out; ties go to the lower row (the item that arrived first).

    >>> top_k_lists(np.array([[1.0, 3.0, 3.0, -np.inf]]), ["u"], 3, {"u": {1}}, ["a", "b", "c", "d"])
    [Recommendation(items=['c', 'a'], scores=[3.0, 1.0])]
    """
    out = []
    n = scores.shape[1]
    for j, user in enumerate(users):
        row = scores[j]
        user_seen = seen.get(user) if exclude_seen else None
        if user_seen:
            row[np.fromiter(user_seen, np.int64, len(user_seen))] = -np.inf
        kk = min(k, n)
        top = np.argpartition(-row, kk - 1)[:kk] if kk < n else np.arange(n)
        top = top[np.lexsort((top, -row[top]))]
        top = top[np.isfinite(row[top])]
        out.append(Recommendation([ids[i] for i in top], row[top].astype(np.float64).tolist()))
    return out


class Recommender(ABC):
    """Learns from micro-batches of increments and recommends top-K items per user."""

    #: increases with every model update (optimizer step)
    version: int = 0

    @abstractmethod
    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        """One model update on a micro-batch of increments."""

    @abstractmethod
    def observe(self, batch: Sequence[Increment]) -> None:
        """Note what known users interacted with (for the seen-item filter) without learning."""

    def frozen_at(self, window_end: int) -> bool:
        """True once learning has stopped (``model.freeze_after_ms``, the frozen-model baseline)."""
        freeze = self.cfg.freeze_after_ms
        return 0 < freeze < window_end

    def warm_up(self, k: int) -> None:
        """Prepare for the first model call listing ``k`` items (compile what it needs); nothing by default."""

    def maintain(self, now: int) -> None:
        """Housekeeping before a model call at event time ``now`` (expiry of stale ids); none by default."""

    @abstractmethod
    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        """Top-``k`` items for each user, over the whole catalogue known so far."""

    def learn_windows(self, windows: Sequence[tuple[int, Sequence[Increment]]], batch_size: int, k: int,
                      exclude_seen: bool = True) -> list[WindowList]:
        """Closed windows in ``window_end`` order: for each, learn its micro-batches, then list its users.

        So every list reflects exactly the events before its ``window_end`` (CONTRACTS §2). This is the
        reference implementation; a model may fuse the loop (see ``OnlineMF``) but must give the same result.
        """
        out = []
        if windows:
            self.maintain(windows[0][0])
        for window_end, increments, batch, frozen, last in self.window_steps(windows, batch_size):
            self.observe(batch) if frozen else self.learn_many(batch)
            if last:
                users = list(dict.fromkeys(inc.user_id for inc in increments))
                for user, rec in zip(users, self.recommend(users, k, exclude_seen)):
                    out.append(WindowList(user, window_end, rec, self.version))
        return out

    def window_steps(self, windows: Sequence[tuple[int, Sequence[Increment]]], batch_size: int):
        """Every micro-batch of the windows, in order: (window_end, the window's increments, the batch,
        whether learning is frozen then, whether it is the window's last batch)."""
        for window_end, increments in windows:
            chunks = micro_batches(increments, batch_size)
            frozen = self.frozen_at(window_end)
            for c, chunk in enumerate(chunks):
                yield window_end, increments, chunk, frozen, c == len(chunks) - 1

    # ---- persistence: named arrays (no pickles), to a file or to bytes for Flink state ----------------
    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Everything the model knows, so that :meth:`from_state` continues exactly where it stands."""

    @classmethod
    @abstractmethod
    def from_state(cls, z: Mapping[str, np.ndarray], cfg) -> "Recommender":
        """The model :meth:`state` describes."""

    def save(self, path: Path) -> Path:
        """Write the model's full state to ``path`` (a readable ``.npz``)."""
        path = Path(path)
        np.savez_compressed(path, **self.state(), state_layout=np.int64(STATE_LAYOUT))
        return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")

    @classmethod
    def restore(cls, path, cfg) -> "Recommender":
        with np.load(path, allow_pickle=False) as z:
            check_fixed_settings(z, cfg)
            return cls.from_state(z, cfg)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.state(), state_layout=np.int64(STATE_LAYOUT))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg) -> "Recommender":
        return cls.restore(io.BytesIO(data), cfg)


# Settings a saved state is made with: the shapes of its variables depend on them.
FIXED_SETTINGS = ("kind", "dim")
# The layout of saved model states (checkpoints, savepoints, files). A release that changes what a model's
# state holds raises it and reads the older layouts; a state of a newer layout is refused, not misread.
STATE_LAYOUT = 1


def check_fixed_settings(z: Mapping[str, np.ndarray], cfg) -> None:
    """A ``ValueError`` naming the setting when a saved state (with its ``config``) cannot be loaded under ``cfg``.

    >>> from freshet.conf.settings import ModelConfig
    >>> saved = {"config": np.frombuffer(json.dumps({"kind": "bpr", "dim": 32}).encode(), np.uint8)}
    >>> check_fixed_settings(saved, ModelConfig(kind="bpr", dim=16))
    Traceback (most recent call last):
    ...
    ValueError: the saved model has model.dim 32, the config says 16: set it back to resume this state
    >>> check_fixed_settings({"state_layout": np.int64(STATE_LAYOUT + 1)}, ModelConfig())
    Traceback (most recent call last):
    ...
    ValueError: the saved model has state layout 2, written by a newer Freshet; this one reads layouts up to 1
    """
    layout = int(z["state_layout"]) if "state_layout" in z else 0       # 0: saved before layouts were numbered
    if layout > STATE_LAYOUT:
        raise ValueError(f"the saved model has state layout {layout}, written by a newer Freshet; this one reads "
                         f"layouts up to {STATE_LAYOUT}")
    if "config" not in z:
        return
    saved = json.loads(bytes(z["config"]).decode())
    for key in FIXED_SETTINGS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ValueError(f"the saved model has model.{key} {saved[key]}, the config says {getattr(cfg, key)}: "
                             "set it back to resume this state")


def pack_seen(seen: Mapping[str, set[int]]) -> dict[str, np.ndarray]:
    """Per-user sets of item rows as three flat arrays (users, offsets, rows)."""
    users = sorted(seen)
    return {"seen_users": np.asarray(users, dtype=object).astype(str),
            "seen_ptr": np.cumsum([0] + [len(seen[u]) for u in users]).astype(np.int64),
            "seen_items": np.asarray([i for u in users for i in sorted(seen[u])], np.int64)}


def unpack_seen(z: Mapping[str, np.ndarray]) -> dict[str, set[int]]:
    ptr, items = z["seen_ptr"], z["seen_items"]
    return {str(u): set(int(i) for i in items[ptr[j]:ptr[j + 1]]) for j, u in enumerate(z["seen_users"])}


def pack_dense(matrix: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """A mostly-zero square matrix as its shape and non-zero entries (flat positions, values).

    >>> z = pack_dense(np.array([[0, 2.5], [0, 0]], np.float32), "m"); unpack_dense(z, "m").tolist()
    [[0.0, 2.5], [0.0, 0.0]]
    """
    flat = np.flatnonzero(matrix)
    small = matrix.size < 2 ** 31
    return {f"{name}_shape": np.asarray(matrix.shape, np.int64), f"{name}_at": flat.astype(np.int32 if small else np.int64),
            f"{name}_values": matrix.reshape(-1)[flat]}


def unpack_dense(z: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    out = np.zeros(int(np.prod(z[f"{name}_shape"])), np.float32)
    out[z[f"{name}_at"]] = z[f"{name}_values"]
    return out.reshape(tuple(int(x) for x in z[f"{name}_shape"]))
