"""Online matrix factorisation with a BPR loss, in TensorFlow, learning one micro-batch per step.

Embedding tables grow as new user and item ids arrive (no vocabulary declared up front): rows are
allocated in a capacity that doubles when full. Each micro-batch is one ``tf.function`` step that
touches only the rows it gathers (sparse updates), so a step costs O(batch), not O(catalogue).

Score of user u for item i: ``<U[u], V[i]> + b[i]``; the item bias carries popularity, so a user the
model does not know yet gets a popularity list.

Rows are handed out by :class:`~freshet.models.id_table.IdTable`: admission after ``model.admit_after``
events (a shared fallback row until then), expiry after ``model.expire_after_ms`` of event time, and at
most ``model.max_users`` / ``model.max_items`` rows, so memory is bounded whatever the number of ids.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = OnlineMF(ModelConfig(kind="bpr", dim=4, initial_capacity=2, seed=1))
>>> stats = m.learn_many([Increment("u1", 60, ("a", "b"), (1.0, 2.0), (1, 1), 2),
...                       Increment("u2", 60, ("c",), (1.0,), (1,), 1)])
>>> stats.pairs, m.version, m.n_users, m.n_items
(3, 1, 2, 3)
>>> rec = m.recommend(["u1"], k=5)[0]
>>> rec.items   # u1 has seen a and b: only c is left
['c']
"""
from __future__ import annotations

import json
import os
import time
from typing import NamedTuple, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from freshet.conf.settings import ModelConfig  # noqa: E402
from freshet.models.base import Recommendation, StepStats, WindowList, pack_seen, unpack_seen  # noqa: E402
from freshet.models.id_table import IdTable  # noqa: E402
from freshet.models.shared import Var  # noqa: E402
from freshet.models.table_model import TableModel  # noqa: E402
from freshet.models.increments import Increment  # noqa: E402
from freshet.models import xla_blocks as xb  # noqa: E402
from freshet.models.xla_blocks import (PAIR_BLOCKS, XLA_EXCL, XLA_EXCL_PAD, XLA_LISTS, XLA_LISTS_PAD,  # noqa: E402
                                       XLA_PAIRS, XLA_PAIRS_PAD, XLA_STEPS)


INIT_STD = 0.1     # user and item vectors start at N(0, INIT_STD), drawn from the seed and the id
ITEM_SIDE = ("item_emb", "item_bias")    # the shared variables a step changes at its items' and negatives' rows


class _Steps(NamedTuple):
    """One model call's work, flat: per step its end offsets into the pair, list and exclusion arrays."""
    pu: np.ndarray          # [P] user row of each positive pair
    pi: np.ndarray          # [P] item row
    pn: np.ndarray          # [P, negatives] sampled negative item rows
    pw: np.ndarray          # [P] pair weight
    pair_end: np.ndarray    # [S] end of each step's pairs
    rec_rows: np.ndarray    # [R] user row of each list to make (0 and rec_known 0: not known yet)
    rec_known: np.ndarray   # [R]
    rec_end: np.ndarray     # [S] end of each step's lists (only a window's last step lists)
    excl_rec: np.ndarray    # [E] list index of each seen-item exclusion (non-decreasing)
    excl_item: np.ndarray   # [E] item row excluded
    excl_end: np.ndarray    # [S] end of each step's exclusions
    visible: np.ndarray     # [S] items born at or before this (relative) step may be listed
    sync: np.ndarray        # [S] 1: copy trained parameters to the serving ones after this step

    @classmethod
    def empty(cls, negatives: int) -> "_Steps":
        """No steps (a call that only compiles)."""
        i32 = np.zeros(0, np.int32)
        return cls(i32, i32, np.zeros((0, negatives), np.int32), np.zeros(0, np.float32), i32, i32,
                   np.zeros(0, np.float32), i32, i32, i32, i32, i32, i32)

    def part(self, s0: int, s1: int) -> "_Steps":
        """Steps [s0, s1), offsets rebased to the part."""
        p0, r0, e0 = (int(a[s0 - 1]) if s0 else 0 for a in (self.pair_end, self.rec_end, self.excl_end))
        p1, r1, e1 = (int(a[s1 - 1]) for a in (self.pair_end, self.rec_end, self.excl_end))
        return _Steps(self.pu[p0:p1], self.pi[p0:p1], self.pn[p0:p1], self.pw[p0:p1], self.pair_end[s0:s1] - p0,
                      self.rec_rows[r0:r1], self.rec_known[r0:r1], self.rec_end[s0:s1] - r0,
                      self.excl_rec[e0:e1] - r0, self.excl_item[e0:e1], self.excl_end[s0:s1] - e0,
                      self.visible[s0:s1], self.sync[s0:s1])


class OnlineMF(TableModel):
    """BPR matrix factorisation with item bias, sparse SGD, growing tables."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # One random stream per purpose, so results do not depend on how work is grouped into calls.
        self._rngs = {"neg": np.random.default_rng([cfg.seed, 2])}
        cap = cfg.initial_capacity
        with tf.device(self.device):     # rows get their initial values when an id gets them (_init_assigned)
            self._U = tf.Variable(tf.zeros([cap, cfg.dim]), name="user_emb")
            self._V = tf.Variable(tf.zeros([cap, cfg.dim]), name="item_emb")
            self._b = tf.Variable(tf.zeros([cap]), name="item_bias")
        # Serving parameters (model.sync_every_ms > 0): copied from the trained ones at each sync point;
        # rows born after the last sync (step > _sync_step) are not served yet.
        self._last_sync, self._sync_step, self._synced_version = -1, -1, 0
        self._serving = None
        if cfg.sync_every_ms > 0:
            with tf.device(self.device):
                self._serving = [tf.Variable(tf.zeros_like(v), name=f"serving{v.name[:-2]}")
                                 for v in (self._U, self._V, self._b)]
        self._compile()

    # ---- tables ---------------------------------------------------------------------------------
    def variables(self) -> list[Var]:
        """User rows are the user's own; item rows and biases are shared."""
        return [Var("user_emb", self._U, "users", 0.0, INIT_STD), Var("item_emb", self._V, "items", 0.0, INIT_STD),
                Var("item_bias", self._b, "items")]

    def _sync_started(self) -> None:
        self._sync.track(ITEM_SIDE)

    def _note_changed(self, items: np.ndarray, negatives: np.ndarray) -> None:
        """The item rows steps change, for the next export: their positive items' and sampled negatives' (a
        padded pair has weight 0: a zero gradient and no regularisation)."""
        if self._sync is not None:
            self._sync.touch(ITEM_SIDE, np.concatenate([np.ravel(items), np.ravel(negatives)]))

    def capacity(self) -> tuple[int, int]:
        return int(self._U.shape[0]), int(self._V.shape[0])

    def _grow(self) -> None:
        """Double a table's capacity until its ids fit; re-trace the step once per growth."""
        grown = False
        for attr, n in (("_U", self.users.high), ("_V", self.items.high)):
            var = getattr(self, attr)
            cap = int(var.shape[0])
            if n <= cap:
                continue
            new_cap = cap
            while new_cap < n:
                new_cap *= 2
            with tf.device(self.device):
                setattr(self, attr, tf.Variable(tf.pad(var, [[0, new_cap - cap], [0, 0]]), name=var.name[:-2]))
                if attr == "_V":
                    self._b = tf.Variable(tf.concat([self._b, tf.zeros([new_cap - cap])], 0), name="item_bias")
            grown = True
        if grown and self._serving is not None:
            with tf.device(self.device):
                self._serving = [tf.Variable(tf.concat([s, tf.zeros([int(t.shape[0]) - int(s.shape[0])] + t.shape[1:], s.dtype)], 0))
                                 for s, t in zip(self._serving, (self._U, self._V, self._b))]
        if grown:
            self._compile()

    # ---- learning -------------------------------------------------------------------------------
    def _compile(self) -> None:
        spec = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, self.cfg.negatives], tf.int32), tf.TensorSpec([None], tf.float32)]
        # Functions written with tf.while_loop need no AutoGraph conversion, which writes a generated module
        # to the temp folder for every function it converts (deleted at interpreter exit, which an
        # interpreter embedded in Flink's TaskManager never reaches).
        self._step = tf.function(self._sgd_step, input_signature=spec, reduce_retracing=True, autograph=False)
        i32 = lambda shape: tf.TensorSpec(shape, tf.int32)  # noqa: E731
        self._fused = tf.function(self._fused_loop, input_signature=[
            i32([None]), i32([None]), i32([None, self.cfg.negatives]), tf.TensorSpec([None], tf.float32),
            i32([None]), i32([None]), tf.TensorSpec([None], tf.float32), i32([None]), i32([None, 2]), i32([None]),
            i32([None]), i32([None]), i32([None]), i32([])])
        # Traced on first use (with model.xla, only steps too big for the program's blocks need it), then
        # called through its concrete function: the polymorphic entry point re-binds and re-checks all 14
        # arguments on every call (~1 ms here), which dominated calls that close only a window or two.
        self._fused_call = None
        self._xla_calls: dict[int, object] = {}   # k -> the compiled program for the current table shapes

    def warm_up(self, k: int) -> None:
        """Trace and compile what the first model call needs for lists of ``k`` (XLA: seconds), now."""
        if self.cfg.xla:
            self._xla_part(_Steps.empty(self.cfg.negatives), np.zeros(int(self._V.shape[0]), np.int32),
                           min(k, int(self._V.shape[0])))

    def _sgd_step(self, u_idx, p_idx, n_idx, w, mask=None):
        """One SGD step on a batch of pairs; ``mask`` (0/1 per pair) leaves padded pairs out."""
        lr, l2 = self.cfg.learning_rate, self.cfg.l2
        if mask is not None:
            w = w * mask
        u = tf.gather(self._U, u_idx)                 # [P, d]
        p = tf.gather(self._V, p_idx)                 # [P, d]
        n = tf.gather(self._V, n_idx)                 # [P, N, d]
        bp = tf.gather(self._b, p_idx)                # [P]
        bn = tf.gather(self._b, n_idx)                # [P, N]
        # Closed-form gradients of the loss below (no tape: a third of the ops, which matters in the
        # fused loop, where op dispatch, not arithmetic, is the cost of a small step):
        #   loss = sum_p w_p * mean_n -log sigmoid(pos_p - neg_pn) + l2 * (|u|^2 + |p|^2 + |n|^2)
        pos = tf.reduce_sum(u * p, -1) + bp                       # [P]
        neg = tf.einsum("pd,pnd->pn", u, n) + bn                  # [P, N]
        margin = pos[:, None] - neg
        g = -tf.sigmoid(-margin) * (w / float(self.cfg.negatives))[:, None]    # d loss / d margin  [P, N]
        gbp = tf.reduce_sum(g, 1)                                 # d loss / d pos
        gbn = -g                                                  # d loss / d neg
        reg_u, reg_p, reg_n = 2 * l2 * u, 2 * l2 * p, 2 * l2 * n
        if mask is not None:
            reg_u, reg_p, reg_n = reg_u * mask[:, None], reg_p * mask[:, None], reg_n * mask[:, None, None]
        gu = gbp[:, None] * p + tf.einsum("pn,pnd->pd", gbn, n) + reg_u
        gp = gbp[:, None] * u + reg_p
        gn = gbn[:, :, None] * u[:, None, :] + reg_n
        pair_loss = -tf.reduce_mean(tf.math.log_sigmoid(margin), axis=1)
        flat_n = tf.reshape(n_idx, [-1])
        self._U.scatter_sub(tf.IndexedSlices(lr * gu, u_idx))
        self._V.scatter_sub(tf.IndexedSlices(lr * gp, p_idx))
        self._V.scatter_sub(tf.IndexedSlices(lr * tf.reshape(gn, [-1, self.cfg.dim]), flat_n))
        self._b.scatter_sub(tf.IndexedSlices(lr * gbp, p_idx))
        self._b.scatter_sub(tf.IndexedSlices(lr * tf.reshape(gbn, [-1]), flat_n))
        return tf.reduce_sum(w * pair_loss) / tf.maximum(tf.reduce_sum(w), 1e-9)

    def positives(self, batch: Sequence[Increment], step: int, protect_from: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Register the batch's ids and interactions at model step ``step``; return (user rows, item
        rows, pair weights). Ids not admitted (yet) train the shared fallback row 0."""
        us, its, ws = [], [], []
        for inc in batch:
            u, rows, weights = self._register(inc, step, protect_from)
            us.append(np.full(len(rows), u, np.int32))
            its.append(rows)
            ws.append(weights)
        self._forget_evicted()
        if not us:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
        return np.concatenate(us), np.concatenate(its), np.concatenate(ws)

    def _sample_negatives(self, n: int) -> np.ndarray:
        """Uniform negatives over the items that have a row now."""
        live = self.items.live_rows()
        if len(live) == 0:
            return np.zeros((n, self.cfg.negatives), np.int32)
        return live[self._rngs["neg"].integers(0, len(live), size=(n, self.cfg.negatives))]

    def observe(self, batch: Sequence[Increment]) -> None:
        """Frozen: known users' seen items grow; no new ids, no parameter change."""
        for inc in batch:
            seen = self.seen.get(inc.user_id)
            if seen is not None:
                seen.update(i for i in (self.items.get(item) for item in inc.items) if i is not None)
                self._seen_arrays.drop(inc.user_id)
        self.steps += 1

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        """One optimizer step on the batch's positive pairs, each against ``negatives`` sampled items."""
        started = time.perf_counter()
        us, its, ws = self.positives(batch, self.steps)
        self.steps += 1
        self._grow()
        self._init_assigned()
        if len(us) == 0:
            return StepStats(0.0, 0, time.perf_counter() - started)
        negs = self._sample_negatives(len(us))
        self._note_changed(its, negs)
        with tf.device(self.device):
            loss = self._step(us, its, negs, ws)
        self.version += 1
        return StepStats(float(loss), len(us), time.perf_counter() - started)

    # ---- fused: many windows in one graph call -------------------------------------------------------
    def learn_windows(self, windows: Sequence[tuple[int, Sequence[Increment]]], batch_size: int, k: int,
                      exclude_seen: bool = True) -> list[WindowList]:
        """Same result as the reference loop in :class:`Recommender`, in one ``tf.function`` call.

        Python prepares every step's positive pairs and negatives, and each window's users with the
        items they had seen by then; one in-graph loop then runs, in order, every SGD step and, after
        the last step of a window, the top-K of its users over the items known at that point.
        """
        if not windows:
            return []
        self.maintain(windows[0][0])
        pu, pi, pw, pn = [], [], [], []
        pair_end, rec_end, excl_end, visible, sync = [], [], [], [], []
        rec_rows, rec_known, excl_rec, excl_item, due = [], [], [], [], []
        n_pairs = n_recs = n_excl = 0
        version = self.version
        step0 = self.steps
        for window_end, increments, chunk, frozen, last in self.window_steps(windows, batch_size):
            step = self.steps
            if frozen:
                self.observe(chunk)
                us = []
            else:
                us, its, ws = self.positives(chunk, step, protect_from=step0)
                self.steps += 1
            if len(us):
                pu.append(us), pi.append(its), pw.append(ws), pn.append(self._sample_negatives(len(us)))
                n_pairs += len(us)
                version += 1
            pair_end.append(n_pairs)
            syncing = last and self._serving is not None and window_end - self._last_sync >= self.cfg.sync_every_ms
            if syncing:
                self._last_sync = window_end - window_end % self.cfg.sync_every_ms
                self._sync_step, self._synced_version = step, version
            sync.append(1 if syncing else 0)
            served_version = version if self._serving is None else self._synced_version
            served_step = step if self._serving is None else self._sync_step
            if last:
                for user in dict.fromkeys(inc.user_id for inc in increments):
                    row = self.users.get(user)
                    seen = self._seen_rows(user, exclude_seen)   # as arrays: heavy users have seen thousands
                    if len(seen):
                        excl_rec.append(np.full(len(seen), n_recs, np.int32))
                        excl_item.append(seen)
                        n_excl += len(seen)
                    rec_rows.append(row or 0)
                    known = row is not None and self.users.born[row] <= served_step
                    rec_known.append(1.0 if known else 0.0)
                    due.append((user, window_end, served_version))
                    n_recs += 1
            rec_end.append(n_recs)
            excl_end.append(n_excl)
            visible.append(served_step - step0)  # items born at or before this step are listed
        self._grow()
        self._init_assigned()
        born = self._item_born(int(self._V.shape[0]), step0)
        k_eff = min(k, int(self._V.shape[0]))
        cat = (lambda parts, dtype, shape: np.concatenate(parts).astype(dtype) if parts
               else np.zeros(shape, dtype))
        items, negatives = cat(pi, np.int32, [0]), cat(pn, np.int32, [0, self.cfg.negatives])
        self._note_changed(items, negatives)
        values, indices = self._run_steps(_Steps(
            cat(pu, np.int32, [0]), items, negatives,
            cat(pw, np.float32, [0]), np.asarray(pair_end, np.int32), np.asarray(rec_rows, np.int32),
            np.asarray(rec_known, np.float32), np.asarray(rec_end, np.int32), cat(excl_rec, np.int32, [0]),
            cat(excl_item, np.int32, [0]), np.asarray(excl_end, np.int32), np.asarray(visible, np.int32),
            np.asarray(sync, np.int32)), born, k_eff)
        self.version = version
        return self._window_lists(due, values, indices)

    def _run_steps(self, st: _Steps, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Run a call's steps in order; return each list's top-K (values, item rows), -inf where empty."""
        with tf.device(self.device):
            if not self.cfg.xla:
                return self._graph_part(st, item_born, k)
            sizes = np.diff(st.pair_end, prepend=0)
            parts, s0, n_steps = [], 0, len(st.pair_end)
            while s0 < n_steps:
                s1 = xb.span(sizes, (st.pair_end, st.rec_end, st.excl_end), (XLA_PAIRS, XLA_LISTS, XLA_EXCL), s0)
                if s1 > s0:
                    parts.append(self._xla_part(st.part(s0, s1), item_born, k))
                else:   # one step too big for the compiled program's blocks
                    s1 = s0 + 1
                    parts.append(self._graph_part(st.part(s0, s1), item_born, k))
                s0 = s1
        return (np.concatenate([v for v, _ in parts]) if parts else np.zeros((0, k), np.float32),
                np.concatenate([i for _, i in parts]) if parts else np.zeros((0, k), np.int32))

    def _graph_part(self, st: _Steps, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._fused_call is None:
            self._fused_call = self._fused.get_concrete_function()
        values, indices = self._fused_call(*(tf.convert_to_tensor(a) for a in (
            st.pu, st.pi, st.pn, st.pw, st.pair_end, st.rec_rows, st.rec_known, st.rec_end,
            np.stack([st.excl_rec, st.excl_item], axis=1), st.excl_end, item_born, st.visible, st.sync, np.int32(k))))
        return values.numpy(), indices.numpy()

    def _xla_part(self, st: _Steps, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps that fit the fixed shapes: padded with zeros (padding is masked out inside)."""
        pad = xb.pad
        pairs, lists, excl = XLA_PAIRS_PAD, XLA_LISTS_PAD, XLA_EXCL_PAD
        n_lists = len(st.rec_rows)
        list_excl_end = np.cumsum(np.bincount(st.excl_rec, minlength=n_lists)[:n_lists]).astype(np.int32)
        values, indices = self._xla_program(k)(*(tf.convert_to_tensor(a) for a in (
            pad(st.pu, pairs), pad(st.pi, pairs), pad(st.pn, pairs), pad(st.pw, pairs),
            pad(st.pair_end, XLA_STEPS), pad(st.rec_end, XLA_STEPS), pad(st.visible, XLA_STEPS),
            pad(st.sync, XLA_STEPS), np.int32(len(st.pair_end)), pad(st.rec_rows, lists), pad(st.rec_known, lists),
            pad(list_excl_end, lists), pad(st.excl_rec, excl), pad(st.excl_item, excl), item_born)))
        return values.numpy()[:n_lists], indices.numpy()[:n_lists]

    def _xla_program(self, k: int):
        """The per-step loop of :meth:`_fused_loop` with static shapes, compiled by XLA: a step becomes a few
        fused kernels instead of dozens of separately dispatched ops."""
        if k in self._xla_calls:
            return self._xla_calls[k]
        negatives, cap_v, inf = self.cfg.negatives, int(self._V.shape[0]), float("-inf")
        take, start, bucket, once = xb.take, xb.start, xb.bucket, xb.once

        def program(pu, pi, pn, pw, pair_end, rec_end, visible, sync, n_steps, rec_rows, rec_known, list_excl_end,
                    excl_rec, excl_item, item_born):
            def learn(size, a, n):
                def run():
                    self._sgd_step(take(pu, a, size), take(pi, a, size), take(pn, a, size), take(pw, a, size),
                                   tf.cast(tf.range(size) < n, tf.float32))
                    return ()
                return run

            def step(s, out_v, out_i):
                a = start(pair_end, s)
                n = tf.gather(pair_end, s) - a
                chosen = tf.where(n > 0, bucket(n, PAIR_BLOCKS), -1)
                for j, size in enumerate(PAIR_BLOCKS):
                    once(chosen == j, learn(size, a, n))
                served = (self._U, self._V, self._b)
                if self._serving is not None:
                    def copy():
                        for target, source in zip(self._serving, served):
                            target.assign(source)
                        return ()
                    once(tf.gather(sync, s) > 0, copy)
                    served = tuple(self._serving)

                def scores_of(r, size):
                    user_vecs = tf.gather(served[0], take(rec_rows, r, size)) * take(rec_known, r, size)[:, None]
                    scores = tf.matmul(user_vecs, served[1], transpose_b=True) + served[2]
                    return tf.where(item_born[None, :] <= tf.gather(visible, s), scores, inf)
                out_v, out_i = xb.list_step(s, rec_end, scores_of, list_excl_end, excl_rec, excl_item, cap_v, k,
                                            out_v, out_i)
                return s + 1, out_v, out_i

            return xb.step_loop(step, n_steps, k)

        i32 = lambda *shape: tf.TensorSpec(shape, tf.int32)  # noqa: E731
        f32 = lambda *shape: tf.TensorSpec(shape, tf.float32)  # noqa: E731
        pairs, lists, excl = XLA_PAIRS_PAD, XLA_LISTS_PAD, XLA_EXCL_PAD
        compiled = tf.function(program, jit_compile=True, autograph=False, input_signature=[
            i32(pairs), i32(pairs), i32(pairs, negatives), f32(pairs), i32(XLA_STEPS), i32(XLA_STEPS), i32(XLA_STEPS),
            i32(XLA_STEPS), i32(), i32(lists), f32(lists), i32(lists), i32(excl), i32(excl), i32(cap_v)])
        self._xla_calls[k] = compiled.get_concrete_function()
        return self._xla_calls[k]

    def _fused_loop(self, pu, pi, pn, pw, pair_end, rec_rows, rec_known, rec_end, excl, excl_end, item_born, visible,
                    sync, k):
        tops_v = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False, element_shape=[None, None])
        tops_i = tf.TensorArray(tf.int32, size=0, dynamic_size=True, infer_shape=False, element_shape=[None, None])
        pair_start = tf.concat([[0], pair_end[:-1]], 0)
        rec_start = tf.concat([[0], rec_end[:-1]], 0)
        excl_start = tf.concat([[0], excl_end[:-1]], 0)
        for s in tf.range(tf.shape(pair_end)[0]):
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            a, b = pair_start[s], pair_end[s]
            self._sgd_step(pu[a:b], pi[a:b], pn[a:b], pw[a:b])
            served = (self._U, self._V, self._b)
            if self._serving is not None:
                if sync[s] > 0:
                    for target, source in zip(self._serving, served):
                        target.assign(source)
                served = self._serving
            r0, r1 = rec_start[s], rec_end[s]
            user_vecs = tf.gather(served[0], rec_rows[r0:r1]) * rec_known[r0:r1, None]  # unknown: popularity only
            scores = tf.matmul(user_vecs, served[1], transpose_b=True) + served[2]
            scores = tf.where(item_born[None, :] <= visible[s], scores, float("-inf"))
            ex = excl[excl_start[s]:excl_end[s]]
            scores = tf.tensor_scatter_nd_update(scores, ex - tf.stack([r0, 0]), tf.fill([tf.shape(ex)[0]], float("-inf")))
            top = tf.math.top_k(scores, k=k)
            tops_v = tops_v.write(s, top.values)
            tops_i = tops_i.write(s, top.indices)
        return tops_v.concat(), tops_i.concat()

    # ---- recommending ---------------------------------------------------------------------------
    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        n_items = self.n_items
        if n_items == 0 or not users:
            return [Recommendation([], []) for _ in users]
        rows = [self.users.get(u) for u in users]
        known = np.asarray([r or 0 for r in rows], np.int32)
        high = self.items.high
        live = np.zeros(high, bool)
        live[self.items.live_rows()] = True
        with tf.device(self.device):
            user_vecs = tf.gather(self._U, known)
            # Users the model does not know (yet) get bias-only (popularity) scores.
            user_vecs = user_vecs * tf.constant([[0.0 if r is None else 1.0] for r in rows])
            scores = tf.matmul(user_vecs, self._V[:high], transpose_b=True) + self._b[:high]
            scores = tf.where(live[None, :], scores, float("-inf"))
            if exclude_seen:
                pairs = [(j, i) for j, u in enumerate(users) for i in self.seen.get(u, ())]
                if pairs:
                    scores = tf.tensor_scatter_nd_update(
                        scores, tf.constant(pairs, tf.int32), tf.fill([len(pairs)], float("-inf")))
            top = tf.math.top_k(scores, k=min(k, n_items))
        values, indices = top.values.numpy(), top.indices.numpy()
        out = []
        for v_row, i_row in zip(values, indices):
            ok = np.isfinite(v_row)
            out.append(Recommendation([self.items.ids[i] for i in i_row[ok]], [float(s) for s in v_row[ok]]))
        return out

    # ---- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Everything the model knows, as named arrays (no pickles): parameters, id tables, seen sets,
        counters and random-stream positions, so a restored model continues exactly where this one is."""
        state = {
            "user_emb": self._U.numpy()[: self.users.high], "item_emb": self._V.numpy()[: self.items.high],
            "item_bias": self._b.numpy()[: self.items.high],
            "counters": np.asarray([self.version, self.steps, self._next_expiry, self._last_sync, self._sync_step,
                                    self._synced_version], np.int64),
            **self.users.state("users"), **self.items.state("items"),
            **pack_seen(self.seen),
            "rng_state": np.frombuffer(json.dumps({k: r.bit_generator.state for k, r in self._rngs.items()}).encode(),
                                       np.uint8),
            "config": np.frombuffer(json.dumps(self.cfg.__dict__).encode(), np.uint8)}
        if self._serving is not None:
            state.update({f"serving_{j}": v.numpy() for j, v in enumerate(self._serving)})
        return state

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "OnlineMF":
        model = cls(cfg)
        model.users = IdTable.from_state(z, "users", cfg.max_users, cfg.admit_after)
        model.items = IdTable.from_state(z, "items", cfg.max_items, cfg.admit_after)
        model._grow()
        with tf.device(model.device):
            model._U[: model.users.high].assign(z["user_emb"])
            model._V[: model.items.high].assign(z["item_emb"])
            model._b[: model.items.high].assign(z["item_bias"])
            if model._serving is not None:
                for j, var in enumerate(model._serving):
                    saved = z[f"serving_{j}"][: int(var.shape[0])]
                    var[: len(saved)].assign(saved)
        model.seen = unpack_seen(z)
        (model.version, model.steps, model._next_expiry, model._last_sync, model._sync_step,
         model._synced_version) = (int(x) for x in z["counters"])
        for name, state in json.loads(bytes(z["rng_state"]).decode()).items():
            if name in model._rngs:     # states saved before rows were drawn from their ids had more streams
                model._rngs[name].bit_generator.state = state
        return model
