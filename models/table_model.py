"""What every model kind with embedding tables shares: device and thread setup, the id tables of users
and items (admission, expiry, a memory bound), each user's seen items (the lists' exclusions), and the
bookkeeping when ids leave. A model kind inherits :class:`TableModel` and keeps its math to itself.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from freshet.conf.settings import ModelConfig  # noqa: E402
from freshet.models.base import Recommendation, Recommender, WindowList  # noqa: E402
from freshet.models.id_table import IdTable  # noqa: E402
from freshet.models.shared import SharedDelta, SyncBase, Var, id_rows  # noqa: E402


def pick_device(preference: str) -> str:
    """``/GPU:0`` when asked for (or ``auto``) and TensorFlow sees a GPU, else ``/CPU:0``."""
    gpus = tf.config.list_physical_devices("GPU") if preference in ("auto", "gpu") else []
    if preference == "gpu" and not gpus:
        raise RuntimeError("model.device is 'gpu' but TensorFlow sees no GPU (is tensorflow[and-cuda] installed?)")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    return "/GPU:0" if gpus else "/CPU:0"


def set_threads(threads: int) -> None:
    """TensorFlow's op thread pools (0: its default, one thread per core). A step here is many tiny ops,
    for which handing work between threads costs more than it saves: one thread halved the model's time
    on 2 cores, where the Flink JVM needs the other. Only possible before TensorFlow starts its runtime."""
    if threads <= 0:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:   # already initialised in this process (a second model): keeps the first setting
        pass


def scatter_add(var, at, values) -> None:
    """``var[at] += values`` (``at``: rows, or cells of a flat variable; repeated ones add up): TensorFlow's
    scatter-add op called as it is. ``Variable.scatter_nd_add`` costs ~60 µs more a call in wrapping (a lazily
    read result, index reshaping), and applying another replica's delta makes one call per shared variable."""
    tf.raw_ops.ResourceScatterAdd(resource=var.handle, indices=at, updates=values)


class SeenArrays:
    """Each user's seen item rows as a growing int32 array, beside the seen sets, for the lists' exclusions.

    Lists exclude everything a user has seen: thousands of rows for a heavy user, in every list. Rows
    are appended as the set gains them (amortised O(1)); a user whose set changed any other way
    (evictions, a restore, frozen observation) is dropped and rebuilt from the set when next listed.
    Only users with at least ``min_rows`` seen rows get an array (a short set is as quickly copied, and
    millions of light users would otherwise each hold one).

    >>> arrays, seen = SeenArrays(min_rows=2), {3, 5}
    >>> arrays.view("u", seen).tolist()
    [3, 5]
    >>> seen.add(9); arrays.extend("u", [9]); arrays.view("u", seen).tolist()
    [3, 5, 9]
    """

    def __init__(self, min_rows: int = 64):
        self.min_rows = min_rows
        self._rows: dict[str, list] = {}     # user -> [array, used length]

    def view(self, user: str, seen: set[int]) -> np.ndarray:
        """The user's seen rows (a view: later appends do not change it)."""
        entry = self._rows.get(user)
        if entry is None:
            rows = np.fromiter(seen, np.int32, len(seen))
            if len(rows) < self.min_rows:
                return rows
            entry = self._rows[user] = [rows, len(rows)]
        return entry[0][: entry[1]]

    def extend(self, user: str, rows: list[int]) -> None:
        """``rows`` were just added to the user's set (and were not in it before)."""
        entry = self._rows.get(user)
        if entry is None:
            return          # built from the set when first needed
        arr, n = entry
        if n + len(rows) > len(arr):
            arr = entry[0] = np.concatenate([arr[:n], np.empty(max(n, len(rows), 8), np.int32)])
        arr[n: n + len(rows)] = rows
        entry[1] = n + len(rows)

    def drop(self, user: str | None = None) -> None:
        """Forget one user's array (``None``: everyone's)."""
        if user is None:
            self._rows.clear()
        else:
            self._rows.pop(user, None)


class TableModel(Recommender):
    """A recommender with user and item id tables and seen-item sets (see :mod:`freshet.models.id_table`)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        set_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.users = IdTable(cfg.max_users, cfg.admit_after)
        self.items = IdTable(cfg.max_items, cfg.admit_after)
        self.seen: dict[str, set[int]] = {}   # user id -> item rows it interacted with (the seen-item filter)
        self._seen_arrays = SeenArrays()      # the same, as arrays, for the lists' exclusions
        self.version = 0
        self.steps = 0                        # micro-batches gone through (learned or observed)
        self._next_expiry = -1
        self._sync: SyncBase | None = None    # set by start_sync: a replica of a parallel model

    @property
    def n_users(self) -> int:
        """Users with a row of their own (admitted, not expired)."""
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def maintain(self, now: int) -> None:
        """Before a model call at event time ``now``: expire stale rows (at most every 1/8 of the horizon)."""
        horizon = self.cfg.expire_after_ms
        if horizon > 0 and now >= self._next_expiry:
            self.users.expire(now, horizon)
            self.items.expire(now, horizon)
            self._next_expiry = now + max(horizon // 8, 1)
            self._forget_evicted()

    # ---- variables: whose they are, their initial rows, and the sync of the shared ones ---------------
    def variables(self) -> list[Var]:
        """Every variable of the model, with whose it is (:mod:`freshet.models.shared`). A model kind lists its
        own; the id tables, seen sets and histories are data the model keeps per user, not variables."""
        return []

    def _init_assigned(self) -> None:
        """Rows handed to ids since the last call start at the ids' initial values: drawn from the seed and
        the id alone, so every replica of a parallel model starts an item alike (and an item's start does
        not depend on when it arrived). Tables must have grown to the rows first."""
        for table, kind in ((self.items, "items"), (self.users, "users")):
            rows = list(dict.fromkeys(table.drain_assigned()))
            if not rows:
                continue
            for v in self.variables():
                if v.kind != kind:
                    continue
                inside = [r for r in rows if r < int(v.var.shape[0])]
                values = id_rows(self.cfg.seed, v.name, [table.ids[r] or "" for r in inside], v.var.shape[1:],
                                 v.fill, v.std)
                v.var.scatter_nd_update(np.asarray(inside, np.int32)[:, None], values)
                if self._sync is not None and v.shared:
                    self._sync.fit(v, v.var.shape)[inside] = values

    def start_sync(self) -> None:
        """From now on, keep what is needed to export this replica's own changes of the shared variables."""
        self._sync = SyncBase([(v, v.var.numpy()) for v in self.variables() if v.shared])
        self._sync_started()

    def _sync_started(self) -> None:
        """A kind that tracks its own changes for the sync starts afresh (nothing by default: its item rows are
        compared whole at each export). One that reports the item rows it changes (``SyncBase.track``/``touch``)
        has only those read and compared: what keeps an export from copying whole tables at a large catalogue
        (docs/PERFORMANCE.md, "What the sync costs")."""

    def export_shared(self, min_change: float = 0.0) -> SharedDelta:
        """This replica's own changes of the shared variables since the last export (after :meth:`start_sync`)."""
        if self._sync is None:
            raise RuntimeError("export_shared before start_sync")
        read = {"item_pairs": self._changed_pairs, "items": self._sync.read, "dense": lambda v: v.var.numpy()}
        return self._sync.export([(v, read[v.kind](v)) for v in self.variables() if v.shared], self.items.ids,
                                 min_change)

    def _changed_pairs(self, v: Var) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For pair counts ``v``: the (first, second) item rows of every cell this replica changed since its last
        export, and their values now. A kind with pair counts keeps track of them (see ``SequenceModel``)."""
        raise NotImplementedError(f"{type(self).__name__} declares pair counts {v.name!r} but does not track them")

    def apply_shared(self, delta: SharedDelta) -> None:
        """Add another replica's changes (:meth:`export_shared`). Items new here are admitted (with their
        initial rows, as the other replica started them); an item that cannot get a row (the table is full
        of rows the current call holds) misses this delta."""
        rows = self.items.find(delta.ids)
        if not rows.all():          # ids new here: admitted now (counted as often as admission asks)
            now = int(self.items.last_seen.max()) if len(self.items.last_seen) else 0
            for at in np.flatnonzero(rows == 0).tolist():
                rows[at] = self.items.lookup(delta.ids[at], now, self.steps, self.items.admit_after)
        inside = rows[rows > 0]
        distinct = len(np.unique(inside)) == len(inside)    # as a rule; not when one id's row went to another here
        self._forget_evicted()
        self._grow()
        self._init_assigned()
        applied: dict[str, np.ndarray] = {}
        for v in self.variables():
            if not v.shared:
                continue
            if v.kind == "dense" and v.name in delta.dense:
                values = np.asarray(delta.dense[v.name], np.float32)
                v.var.assign_add(values)
                at = None
            elif v.kind == "items" and v.name in delta.rows:
                positions, values = delta.rows[v.name]
                at = rows[positions]
                keep = (at > 0) & (at < int(v.var.shape[0]))
                at, values = at[keep], np.asarray(values, np.float32)[keep]
                scatter_add(v.var, at, values)
            elif v.kind == "item_pairs" and v.name in delta.pairs:
                first, second, values = delta.pairs[v.name]
                m = int(round(int(v.var.shape[0]) ** 0.5))
                a, b = rows[first], rows[second]
                keep = (a > 0) & (b > 0) & (a < m) & (b < m)
                at, values = a[keep] * m + b[keep], np.asarray(values, np.float32)[keep]
                scatter_add(v.var, at, values)
            else:
                continue
            applied[v.name] = at
            if self._sync is not None:
                self._sync.received(v, at, values, distinct)
        self._shared_applied(applied)
        self.version += 1

    def _shared_applied(self, applied: dict[str, np.ndarray | None]) -> None:
        """Another replica's changes were added to ``applied`` (variable -> the rows or cells changed; ``None``:
        all of a dense one): a model kind refreshes what it derives from its variables there."""

    def _forget_evicted(self) -> None:
        """Drop what was kept about ids that lost their rows (seen sets; evicted items from every set)."""
        for user, _ in self.users.drain_evicted():
            self.seen.pop(user, None)
            self._seen_arrays.drop(user)
            self._forget_user(user)
        gone = {row for _, row in self.items.drain_evicted() if row}
        if gone:
            for seen in self.seen.values():
                seen.difference_update(gone)
            self._seen_arrays.drop()
            self._forget_items(gone)

    def _forget_user(self, user: str) -> None:
        """A user left the table: what else a model kind keeps about them goes too (nothing by default)."""

    def _forget_items(self, rows: set[int]) -> None:
        """Item rows were freed (nothing more to forget by default)."""

    def _register(self, inc, step: int, protect_from: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
        """Look up an increment's user and items at model step ``step`` (admission, recency; rows used at steps
        >= ``protect_from`` are not evicted) and note the items it has seen. Returns (user row, item rows of its
        positive items, their weights ``log1p(weight)``); ids not admitted (yet) get the fallback row 0."""
        u = self.users.lookup(inc.user_id, inc.window_end, step, inc.events, protect_from)
        seen = self.seen.setdefault(inc.user_id, set()) if u or inc.user_id in self.users.pending else None
        rows, weights, new = [], [], []
        for item, weight, count in zip(inc.items, inc.weights, inc.counts):
            i = self.items.lookup(item, inc.window_end, step, count, protect_from)
            if i and seen is not None and i not in seen:
                seen.add(i)
                new.append(i)
            if weight > 0:
                rows.append(i)
                weights.append(np.log1p(weight))
        if new:
            self._seen_arrays.extend(inc.user_id, new)
        return u, np.asarray(rows, np.int32), np.asarray(weights, np.float32)

    def _seen_rows(self, user: str, exclude_seen: bool = True) -> np.ndarray:
        """The item rows a list of ``user`` leaves out (none when ``exclude_seen`` is off)."""
        seen = self.seen.get(user) if exclude_seen else None
        return self._seen_arrays.view(user, seen) if seen else np.zeros(0, np.int32)

    def _item_born(self, capacity: int, step0: int) -> np.ndarray:
        """Per item row, the step (relative to ``step0``) at which its id got it; free rows and rows past
        the table never (a large number): a list at relative step s lists the rows born at or before s."""
        born = np.full(capacity, 1 << 30, np.int64)
        born[: self.items.high] = np.clip(self.items.born[: self.items.high] - step0, -(1 << 30), 1 << 30)
        return born.astype(np.int32)

    def _window_lists(self, due, values: np.ndarray, indices: np.ndarray) -> list[WindowList]:
        """The lists of a call: ``due`` (user, window_end, model_version) with each one's top-K values and item
        rows (-inf where there were fewer than K items)."""
        ids, ok = self.items.ids, np.isfinite(values)
        full = ok.all(1).tolist()
        out = []
        for j, ((user, window_end, ver), v_row, i_row) in enumerate(zip(due, values.astype(np.float64).tolist(),
                                                                       indices.tolist())):
            if not full[j]:     # a list shorter than K (few items listable)
                v_row, i_row = values[j][ok[j]].astype(np.float64).tolist(), indices[j][ok[j]].tolist()
            out.append(WindowList(user, window_end, Recommendation([ids[i] for i in i_row], v_row), ver))
        return out
