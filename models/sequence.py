"""A sequence-aware model: a user is what they just did, learned online with a sampled softmax.

The user representation is not a per-user parameter but a function of the user's recent behaviour
(:class:`~freshet.models.history.UserHistory`): the last ``model.history`` items, each weighted by its
behaviour weight times ``model.history_decay ** age`` (age in the user's windows), averaged over a
*context* embedding of each item (FISM / asymmetric factorisation)::

    q(u) = sum_j a_j E_in[h_j] / sum_j a_j
    score(u, i) = <q(u), E_out[i]> / T  +  b[i]  +  theta * log(0.01 + memory(h, i))

``memory(h, i)`` is the *counted* transitions from the context items to ``i`` (either order with
``model.transition_symmetric``, normalised by ``model.transition_alpha`` as the transition baseline does),
over the first ``model.sequence_memory_items`` items; ``theta`` is learned with the embeddings (Wide &
Deep: the counts memorise frequent transitions, the embeddings generalise). The counts are updated by
counting, in order, as each micro-batch is learned. Why this design: docs/EVALUATION.md.

Objective: a list made at ``window_end`` serves until the user's next window, so the model learns to
predict the items of a user's *next increment* from the history before it. Each positive (context,
item) pair is a softmax over the item and ``model.sequence_negatives`` items sampled uniformly per
micro-batch and shared by its pairs (uniform sampling needs no logQ correction: it shifts every
logit equally; sampled copies of the positive are masked). One sparse Adagrad step per micro-batch
touches only the gathered rows.

Variables, and whom they belong to (what a parallel model needs to know): ``E_in``, ``E_out``, ``b``,
``theta`` and the transition counts are **shared** (item rows); their Adagrad accumulators are each replica's
own (**local**: a replica sizes its steps by its own gradients; synced as well until stop 34, they were 40 % of
the sync's bytes and time for no better HR@10, docs/PERFORMANCE.md); the **per-user** state is the history and
the seen-item set, which are data, not parameters: a user's list needs no per-user training.

Tables grow as new items arrive (:class:`~freshet.models.id_table.IdTable`: admission, expiry and a
memory bound, as for BPR); users live in an :class:`IdTable` too, so the number of histories is bounded
by ``model.max_users`` and they expire with ``model.expire_after_ms``.

>>> from freshet.conf.settings import ModelConfig
>>> from freshet.models.increments import Increment
>>> m = SequenceModel(ModelConfig(kind="sequence", dim=4, initial_capacity=4, sequence_negatives=4, xla=False))
>>> _ = m.learn_many([Increment("u1", 60, ("a", "b"), (1.0, 1.0), (1, 1), 2)])
>>> stats = m.learn_many([Increment("u1", 120, ("c",), (1.0,), (1,), 1)])
>>> stats.pairs, m.n_items                      # "c" after u1's history (a, b): one pair
(1, 3)
>>> m.recommend(["u1"], k=5)[0].items           # u1 has seen everything
[]
"""
from __future__ import annotations

import json
import time
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow as tf

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, StepStats, WindowList, pack_seen, top_k_lists, unpack_seen
from freshet.models.history import UserHistory
from freshet.models.id_table import IdTable
from freshet.models.increments import Increment
from freshet.models.shared import Var
from freshet.models import xla_blocks as xb
from freshet.models.table_model import TableModel
from freshet.models.transition import TransitionCounts
from freshet.models.xla_blocks import (PAIR_BLOCKS, XLA_EXCL, XLA_EXCL_PAD, XLA_LISTS, XLA_LISTS_PAD, XLA_PAIRS,
                                       XLA_PAIRS_PAD, XLA_STEPS)

ADAGRAD_INIT = 0.1
INIT_STD = 0.05              # an item's embeddings start at N(0, INIT_STD), drawn from the seed and its id
MEMORY_THETA_INIT = 1.0      # initial weight of the memory feature (learned)
MEMORY_EPS = 0.01            # feature = log(MEMORY_EPS + normalised transition count)
# The counts are read from a float16 copy (half the bytes of the largest read, a context's count rows), scaled so
# that counts up to 65504 / READ_SCALE (16.7 M) fit; relative error 1e-3, far below what the log feature resolves.
READ_SCALE = 2.0 ** -8
FLOAT16_MAX = 65504.0
# The compiled program's pair blocks: up to 64 pairs a step (a step with more goes through the plain path; on
# MovieLens no step has more than 40), and its group blocks (a group: one increment's pairs, one context).
BLOCKS = tuple(b for b in PAIR_BLOCKS if b <= 64)
GROUP_BLOCKS = (1, 2, 4, 16, BLOCKS[-1])
# The item-row variables a step changes at its contexts' rows, and at its items' and negatives' rows.
CONTEXT_SIDE = ("item_context_emb", "transitions_out")
OUTPUT_SIDE = ("item_emb", "item_bias")


class _Work(NamedTuple):
    """One model call, flat: per step the end offsets of its groups, pairs, lists and exclusions."""
    grp_rows: np.ndarray    # [G, L] context item rows of each group (an increment with a context and positives)
    grp_w: np.ndarray       # [G, L] their weights
    grp_end: np.ndarray     # [S]
    pair_grp: np.ndarray    # [P] each positive pair's group (index into grp_*)
    item: np.ndarray        # [P] positive item row
    weight: np.ndarray      # [P] pair weight
    pair_end: np.ndarray    # [S]
    neg: np.ndarray         # [S, M] each step's shared negatives
    list_rows: np.ndarray   # [R, L] context of each list to make
    list_w: np.ndarray      # [R, L]
    rec_end: np.ndarray     # [S]
    excl_rec: np.ndarray    # [E] list index of each exclusion
    excl_item: np.ndarray   # [E]
    excl_end: np.ndarray    # [S]
    visible: np.ndarray     # [S] items born at or before this (relative) step may be listed

    def part(self, s0: int, s1: int) -> "_Work":
        g0, p0, r0, e0 = (int(a[s0 - 1]) if s0 else 0 for a in (self.grp_end, self.pair_end, self.rec_end, self.excl_end))
        g1, p1, r1, e1 = (int(a[s1 - 1]) for a in (self.grp_end, self.pair_end, self.rec_end, self.excl_end))
        return _Work(self.grp_rows[g0:g1], self.grp_w[g0:g1], self.grp_end[s0:s1] - g0, self.pair_grp[p0:p1] - g0,
                     self.item[p0:p1], self.weight[p0:p1], self.pair_end[s0:s1] - p0, self.neg[s0:s1], self.list_rows[r0:r1], self.list_w[r0:r1],
                     self.rec_end[s0:s1] - r0, self.excl_rec[e0:e1] - r0, self.excl_item[e0:e1],
                     self.excl_end[s0:s1] - e0, self.visible[s0:s1])


class SequenceModel(TableModel):
    """Next-window prediction from the user's recent items (FISM-style context, sampled softmax, Adagrad)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)      # users' table bounds how many histories are kept
        self.history = UserHistory(cfg.history, cfg.history_decay)
        self._rngs = {"neg": np.random.default_rng([cfg.seed, 2])}
        cap = cfg.initial_capacity
        with tf.device(self.device):     # rows get their initial values when an id gets them (_init_assigned)
            self.E_in = tf.Variable(tf.zeros([cap, cfg.dim]), name="item_context_emb")
            self.E_out = tf.Variable(tf.zeros([cap, cfg.dim]), name="item_emb")
            self.b = tf.Variable(tf.zeros([cap]), name="item_bias")
            self.acc = [tf.Variable(tf.fill(v.shape, ADAGRAD_INIT), name=f"adagrad_{j}")
                        for j, v in enumerate((self.E_in, self.E_out, self.b))]
            # The memory: counted transitions (not trained by gradient) and the learned weight of their feature.
            # The counts live in the program only (``T``, ``T_out``, ``T_read``), which reads them for the pairs'
            # features and the lists and counts each step's pairs; :meth:`_counts` makes their numpy form when
            # the state or a reused row needs it.
            m = min(cap, cfg.sequence_memory_items)
            self.T = tf.Variable(tf.zeros([m * m]), trainable=False, name="transitions")   # [m, m], flat
            self.T_read = tf.Variable(self._read_copy(self.T), trainable=False, name="transitions_read")
            self.T_out = tf.Variable(tf.zeros([m]), trainable=False, name="transitions_out")
            self.theta = tf.Variable([MEMORY_THETA_INIT if m else 0.0], name="memory_weight")
            self.acc_theta = tf.Variable([ADAGRAD_INIT], name="adagrad_memory_weight")
        self._compile()

    # ---- tables ---------------------------------------------------------------------------------
    def variables(self) -> list[Var]:
        """All shared (item side): a user is their history, which is data, not a variable."""
        names = ("adagrad_0", "adagrad_1", "adagrad_2")
        return [Var("item_context_emb", self.E_in, "items", 0.0, INIT_STD),
                Var("item_emb", self.E_out, "items", 0.0, INIT_STD), Var("item_bias", self.b, "items"),
                *(Var(n, a, "items", ADAGRAD_INIT, local=True) for n, a in zip(names, self.acc)),
                Var("transitions", self.T, "item_pairs"), Var("transitions_out", self.T_out, "items"),
                Var("memory_weight", self.theta, "dense"),
                Var("adagrad_memory_weight", self.acc_theta, "dense", local=True)]

    def _sync_started(self) -> None:
        self._counted: list[np.ndarray] = []     # [2, n] (context row, item row) counted since the last export
        self._sync.track(CONTEXT_SIDE + OUTPUT_SIDE)

    def _note_changed(self, grp_r, grp_w, pair_grp, items, weights, neg) -> None:
        """What steps change, kept for the next export: the item rows of their contexts (context side), of their
        items and negatives (output side), and which count cells (as :meth:`_count` selects them). A row of a
        context or a pair of weight 0 gets a zero gradient and count, so it does not change."""
        if self._sync is None or not len(items):
            return
        context, output = grp_r[grp_w > 0], np.concatenate([items, np.asarray(neg).reshape(-1)])
        self._sync.touch(CONTEXT_SIDE, context)
        self._sync.touch(OUTPUT_SIDE, output)
        h = grp_r[pair_grp]
        i = np.broadcast_to(items[:, None], h.shape)
        ok = (grp_w[pair_grp] > 0) & (weights[:, None] > 0)     # rows past the memory: left out at the export
        self._counted.append(np.stack([h[ok], i[ok]]))
        if self.cfg.transition_symmetric:
            self._counted.append(np.stack([i[ok], h[ok]]))

    def _changed_pairs(self, v):
        m = self.memory_size
        pairs = np.concatenate(self._counted + [np.zeros((2, 0), np.int64)], 1).astype(np.int64)
        self._counted = []
        pairs = pairs[:, (pairs < m).all(0)]
        cells = np.unique(pairs[0] * m + pairs[1])
        first, second = cells // m, cells % m
        return first, second, tf.gather(v.var, cells).numpy() if len(cells) else np.zeros(0, np.float32)

    def _shared_applied(self, applied) -> None:
        """The float16 read copy of the counts, at the cells another replica's counts were added to."""
        cells = applied.get("transitions")
        if cells is not None and len(cells):
            cells = tf.constant(cells, tf.int64)
            self.T_read.scatter_update(tf.IndexedSlices(self._read_copy(tf.gather(self.T, cells)), cells))

    def capacity(self) -> int:
        return int(self.E_in.shape[0])

    @property
    def memory_size(self) -> int:
        """Item rows the counts cover (the first ``memory_size`` rows; 0: no memory)."""
        return int(self.T_out.shape[0])

    def _variables(self) -> list[tf.Variable]:
        return [self.E_in, self.E_out, self.b, *self.acc]

    def _grow(self) -> None:
        cap, n = self.capacity(), self.items.high
        if n <= cap:
            return
        new = cap
        while new < n:
            new *= 2
        extra = new - cap
        with tf.device(self.device):
            self.E_in = tf.Variable(tf.pad(self.E_in, [[0, extra], [0, 0]]), name="item_context_emb")
            self.E_out = tf.Variable(tf.pad(self.E_out, [[0, extra], [0, 0]]), name="item_emb")
            self.b = tf.Variable(tf.concat([self.b, tf.zeros([extra])], 0), name="item_bias")
            self.acc = [tf.Variable(tf.concat([a, tf.fill([extra] + a.shape[1:], ADAGRAD_INIT)], 0), name=a.name[:-2])
                        for a in self.acc]
            m_old = self.memory_size
            m = TransitionCounts.grown_size(m_old, new, self.cfg.sequence_memory_items)
            if m > m_old:
                grown = tf.pad(tf.reshape(self.T, [m_old, m_old]), [[0, m - m_old], [0, m - m_old]])
                self.T = tf.Variable(tf.reshape(grown, [-1]), trainable=False, name="transitions")
                self.T_read = tf.Variable(self._read_copy(self.T), trainable=False, name="transitions_read")
                self.T_out = tf.Variable(tf.pad(self.T_out, [[0, m - m_old]]), trainable=False, name="transitions_out")
        self._compile()

    def _counts(self) -> TransitionCounts:
        """The program's counts as numpy (a copy, made when needed: the state, reused rows)."""
        m = self.memory_size
        return TransitionCounts.of(self.T.numpy().reshape(m, m), self.T_out.numpy(), self.cfg.sequence_memory_items,
                                   self.cfg.transition_alpha, self.cfg.transition_symmetric)

    def _assign_counts(self, counts: TransitionCounts) -> None:
        """Numpy counts (of the program's size) into the program, and its float16 read copy."""
        self.T.assign(counts.counts.reshape(-1))
        self.T_out.assign(counts.out)
        self.T_read.assign(self._read_copy(self.T))

    @staticmethod
    def _read_copy(counts):
        return tf.cast(tf.minimum(counts * READ_SCALE, FLOAT16_MAX), tf.float16)

    def _forget_user(self, user: str) -> None:
        self.history.forget(user)

    def _forget_items(self, rows: set[int]) -> None:
        """Freed rows: out of every history, and their counts (both ways) zeroed before a new id gets them."""
        self.history.drop_rows(rows)
        if any(r < self.memory_size for r in rows):     # rare (evictions)
            counts = self._counts()
            counts.zero(sorted(rows))
            self._assign_counts(counts)
            if self._sync is not None:    # forgotten here, not a change for the other replicas
                for v in self.variables():
                    if v.name in ("transitions", "transitions_out"):
                        self._sync.forget(v, sorted(rows))

    # ---- the model's math (once; the reference and the fused loop both call it) -------------------
    def _encode(self, rows, weights):
        """User vectors from contexts: ``rows``/``weights`` [B, L] -> [B, d] (zero for an empty context)."""
        return self._pool(tf.gather(self.E_in, rows), weights)

    @staticmethod
    def _pool(emb, weights):
        w = weights / tf.maximum(tf.reduce_sum(weights, 1, keepdims=True), 1e-9)
        return tf.einsum("bl,bld->bd", w, emb)

    def _scores(self, rows, weights):
        """[B, capacity]: every item's score for each context."""
        q = self._encode(rows, weights) / self.cfg.sequence_temperature
        scores = tf.matmul(q, self.E_out, transpose_b=True) + self.b
        if self.memory_size:
            memory = tf.pad(self._memory(rows, weights), [[0, 0], [0, int(self.E_out.shape[0]) - self.memory_size]])
            scores += self.theta[0] * tf.math.log(MEMORY_EPS + memory)
        return scores

    def _memory(self, rows, weights):
        """[B, m]: the memory of each context over every counted item, ``sum_j a_j counts[h_j]``: a weighted sum of
        contiguous rows of the counts (:meth:`_memory_weights`)."""
        m = self.memory_size
        a, h = self._memory_weights(rows, weights)
        rows = tf.cast(tf.gather(tf.reshape(self.T_read, [m, m]), h), tf.float32)
        return tf.einsum("bl,blm->bm", a / READ_SCALE, rows)

    def _memory_weights(self, rows, weights):
        """Each context row's share of the memory feature: its weight over the context's total, divided by
        (how often the item was followed + 1) ** transition_alpha; rows beyond the memory count nothing."""
        m = self.memory_size
        inside = tf.cast(rows < m, tf.float32)
        h = tf.minimum(rows, m - 1)
        share = weights / tf.maximum(tf.reduce_sum(weights, 1, keepdims=True), 1e-9)
        return share * inside * tf.pow(tf.gather(self.T_out, h) + 1.0, -self.cfg.transition_alpha), h

    def _memory_at(self, rows, weights, cand):
        """[B, C]: the memory of each context at candidate items only, ``cand`` [B, C] (or [1, C] shared by all):
        the cells ``counts[h_j, c]`` gathered, never the contexts' whole rows (:meth:`_memory`); 0 past the memory."""
        m = self.memory_size
        a, h = self._memory_weights(rows, weights)
        cells = tf.cast(tf.gather(self.T_read, h[:, :, None] * m + tf.minimum(cand, m - 1)[:, None, :]), tf.float32)
        return tf.einsum("bl,blc->bc", a / READ_SCALE, cells) * tf.cast(cand < m, tf.float32)

    def _pair_features(self, neg_memory, group, ctx_rows, ctx_w, item):
        """[P, 1 + M]: the feature, ``log(MEMORY_EPS + memory)``, of each pair's item and then of the shared
        negatives, where pair p's context (``ctx_rows``/``ctx_w`` [P, L]) is group ``group[p]``, whose memory at
        the negatives is ``neg_memory[group[p]]`` (:meth:`_memory_at`, once per group)."""
        at_item = self._memory_at(ctx_rows, ctx_w, item[:, None])                          # [P, 1]
        return tf.math.log(MEMORY_EPS + tf.concat([at_item, tf.gather(neg_memory, group)], 1))

    def _train(self, ctx_rows, ctx_w, item, weight, neg, feature):
        """One optimizer step: sampled softmax of each pair's item against the shared negatives ``neg`` [M],
        each logit plus the learned weight times the pair's memory ``feature`` [P, 1 + M] (:meth:`_pair_features`).
        Pairs of weight 0 (padding) change nothing. Returns the weighted mean loss."""
        m = self.memory_size
        emb = tf.gather(self.E_in, ctx_rows)                     # [P, L, d]
        out_p, out_n = tf.gather(self.E_out, item), tf.gather(self.E_out, neg)
        b_p, b_n = tf.gather(self.b, item), tf.gather(self.b, neg)
        theta = tf.identity(self.theta)
        with tf.GradientTape() as tape:
            tape.watch([emb, out_p, out_n, b_p, b_n, theta])
            q = self._pool(emb, ctx_w) / self.cfg.sequence_temperature
            pos = tf.reduce_sum(q * out_p, -1) + b_p                                   # [P]
            negl = tf.matmul(q, out_n, transpose_b=True) + b_n                         # [P, M]
            if m:
                pos += theta[0] * feature[:, 0]
                negl += theta[0] * feature[:, 1:]
            negl = tf.where(tf.equal(item[:, None], neg[None, :]), -1e9, negl)         # a sampled positive
            pair_loss = tf.reduce_logsumexp(tf.concat([pos[:, None], negl], 1), 1) - pos
            loss = tf.reduce_sum(weight * pair_loss)
        g_emb, g_p, g_n, g_bp, g_bn, g_theta = tape.gradient(loss, [emb, out_p, out_n, b_p, b_n, theta])
        self._adagrad(0, tf.reshape(ctx_rows, [-1]), tf.reshape(g_emb, [-1, self.cfg.dim]))
        self._adagrad(1, tf.concat([item, neg], 0), tf.concat([g_p, g_n], 0))
        self._adagrad(2, tf.concat([item, neg], 0), tf.concat([g_bp, g_bn], 0))
        if m:
            self.acc_theta.assign_add(g_theta * g_theta)
            self.theta.assign_sub(self.cfg.sequence_learning_rate * g_theta * tf.math.rsqrt(self.acc_theta))
        return loss / tf.maximum(tf.reduce_sum(weight), 1e-9)

    def _train_and_count(self, grp_rows, grp_w, pair_grp, item, weight, neg):
        """One step outside the compiled program: the groups' contexts ``grp_rows``/``grp_w`` [G, L] and each
        pair's group ``pair_grp`` [P] (the memory at the negatives is read per group: [G, L, M] cells)."""
        ctx_rows, ctx_w = tf.gather(grp_rows, pair_grp), tf.gather(grp_w, pair_grp)
        feature = (self._pair_features(self._memory_at(grp_rows, grp_w, neg[None, :]), pair_grp, ctx_rows, ctx_w, item)
                   if self.memory_size else tf.zeros([tf.shape(item)[0], 1 + self.cfg.sequence_negatives]))
        loss = self._train(ctx_rows, ctx_w, item, weight, neg, feature)
        with tf.control_dependencies([loss]):
            self._count(ctx_rows, ctx_w, item, weight)
        return tf.identity(loss)

    def _count(self, ctx_rows, ctx_w, item, weight):
        """The memory learns by counting: each pair's item followed each of its context items (by context
        weight x pair weight). Kept apart from :meth:`_train`: XLA copies the whole count matrix when one
        loop body both gathers from it and scatters into it."""
        m = self.memory_size
        if not m:
            return
        h, i = tf.minimum(ctx_rows, m - 1), tf.minimum(item, m - 1)[:, None]
        counted = ctx_w * tf.cast(ctx_rows < m, tf.float32) * tf.cast(item < m, tf.float32)[:, None] * weight[:, None]
        at, back, s = h * m + i, i * m + h, self.cfg.transition_symmetric     # T[h, i] and, symmetric, T[i, h]
        updates, where = (counted, at) if not s else (tf.concat([counted, s * counted], 1), tf.concat([at, back], 1))
        where = tf.reshape(where, [-1])
        self.T.scatter_add(tf.IndexedSlices(tf.reshape(updates, [-1]), where))
        self.T_read.scatter_update(tf.IndexedSlices(self._read_copy(tf.gather(self.T, where)), where))
        self.T_out.scatter_add(tf.IndexedSlices(tf.reshape(counted, [-1]), tf.reshape(h, [-1])))

    def _adagrad(self, j: int, rows, grad):
        """Sparse Adagrad on the gathered rows (duplicate rows: each occurrence applies its own share)."""
        var, acc = (self.E_in, self.E_out, self.b)[j], self.acc[j]
        acc.scatter_add(tf.IndexedSlices(grad * grad, rows))
        var.scatter_sub(tf.IndexedSlices(self.cfg.sequence_learning_rate * grad * tf.math.rsqrt(tf.gather(acc, rows)), rows))

    # ---- the reference path: one micro-batch, one window at a time --------------------------------
    def _compile(self) -> None:
        d = None
        i32, f32 = tf.int32, tf.float32
        self._train_fn = tf.function(self._train_and_count, autograph=False, input_signature=[
            tf.TensorSpec([d, self.cfg.history], i32), tf.TensorSpec([d, self.cfg.history], f32),
            tf.TensorSpec([d], i32), tf.TensorSpec([d], i32), tf.TensorSpec([d], f32), tf.TensorSpec([d], i32)])
        self._scores_fn = tf.function(self._scores, autograph=False, input_signature=[
            tf.TensorSpec([d, self.cfg.history], i32), tf.TensorSpec([d, self.cfg.history], f32)])
        self._xla_calls: dict[int, object] = {}

    def _pairs(self, batch: Sequence[Increment], step: int, protect_from: int | None = None):
        """The micro-batch's positive pairs, each with its user's context *before* the increment; then the
        increments join their users' histories. Returns per increment with a context and positives:
        (ctx_rows [L], ctx_w [L], items [n], weights [n])."""
        groups = []
        for inc in batch:
            u, rows, ws = self._register(inc, step, protect_from)
            if not (u or inc.user_id in self.users.pending):    # no row: no history either (as for BPR)
                continue
            r, w = self.history.context(inc.user_id)
            if len(rows) and w.any():
                groups.append((r, w, rows, ws))
            if len(rows):
                self.history.append(inc.user_id, rows, ws)
        self._forget_evicted()
        return groups

    def _step_arrays(self, groups):
        """Groups (a step's, or a whole call's) and their pairs as flat arrays: the groups' contexts (rows, weights
        [G, L]), then each pair's group [P], item and weight [P]."""
        L = self.cfg.history
        if not groups:
            i32, f32 = np.zeros(0, np.int32), np.zeros(0, np.float32)
            return np.zeros((0, L), np.int32), np.zeros((0, L), np.float32), i32, i32, f32
        sizes = [len(items) for *_, items, _ in groups]
        return (np.stack([r for r, *_ in groups]), np.stack([w for _, w, *_ in groups]),
                np.repeat(np.arange(len(groups), dtype=np.int32), sizes),
                np.concatenate([items for *_, items, _ in groups]), np.concatenate([ws for *_, ws in groups]))

    def _negatives(self, lives: Sequence[np.ndarray | None]) -> np.ndarray:
        """[S, sequence_negatives]: per step, item rows drawn uniformly from its ``lives[s]``, the rows that had
        an item at that step (``items.live_rows()``, shared by the step's pairs); zeros for a step with None (no
        pairs) or no items. Steps in a row with the same live rows draw in one call: the same numbers as one
        call per step."""
        M = self.cfg.sequence_negatives
        out = np.zeros((len(lives), M), np.int32)
        s = 0
        while s < len(lives):
            live, e = lives[s], s + 1
            while e < len(lives) and lives[e] is live:
                e += 1
            if live is not None and len(live):
                out[s:e] = live[self._rngs["neg"].integers(0, len(live), size=(e - s, M))]
            s = e
        return out

    def observe(self, batch: Sequence[Increment]) -> None:
        """Frozen: known users' seen items and histories grow; no new ids, no parameter change."""
        for inc in batch:
            seen = self.seen.get(inc.user_id)
            if seen is None:
                continue
            rows = [(self.items.get(item), w) for item, w in zip(inc.items, inc.weights)]
            rows = [(i, w) for i, w in rows if i is not None]
            seen.update(i for i, _ in rows)
            self._seen_arrays.drop(inc.user_id)
            positive = [(i, np.log1p(w)) for i, w in rows if w > 0]
            if positive:
                self.history.append(inc.user_id, [i for i, _ in positive], [w for _, w in positive])
        self.steps += 1

    def learn_many(self, batch: Sequence[Increment]) -> StepStats:
        started = time.perf_counter()
        groups = self._pairs(batch, self.steps)
        self.steps += 1
        self._grow()
        self._init_assigned()
        if batch:
            self.version += 1     # histories changed, so lists do, with or without a gradient step
        if not groups:
            return StepStats(0.0, 0, time.perf_counter() - started)
        neg = self._negatives([self.items.live_rows()])[0]
        grp_r, grp_w, pair_grp, items, weights = self._step_arrays(groups)
        self._note_changed(grp_r, grp_w, pair_grp, items, weights, neg)
        with tf.device(self.device):
            loss = self._train_fn(grp_r, grp_w, pair_grp, items, weights, neg)
        return StepStats(float(loss), len(items), time.perf_counter() - started)

    def recommend(self, users: Sequence[str], k: int, exclude_seen: bool = True) -> list[Recommendation]:
        if not users or self.n_items == 0:
            return [Recommendation([], []) for _ in users]
        rows, weights = self.history.contexts(users)
        with tf.device(self.device):
            scores = self._scores_fn(rows, weights).numpy()
        live = np.zeros(scores.shape[1], bool)
        live[self.items.live_rows()] = True
        scores[:, ~live] = -np.inf
        return top_k_lists(scores, users, k, self.seen, self.items.ids, exclude_seen)

    # ---- fused: every window of a call in one XLA program ------------------------------------------
    def warm_up(self, k: int) -> None:
        if self.cfg.xla:
            self._run(self._empty_work(), np.zeros(self.capacity(), np.int32), min(k, self.capacity()))

    def _empty_work(self) -> _Work:
        L, M = self.cfg.history, self.cfg.sequence_negatives
        i32, f32 = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return _Work(np.zeros((0, L), np.int32), np.zeros((0, L), np.float32), i32, i32, i32, f32, i32,
                     np.zeros((0, M), np.int32), np.zeros((0, L), np.int32), np.zeros((0, L), np.float32), i32, i32,
                     i32, i32, i32)

    def learn_windows(self, windows: Sequence[tuple[int, Sequence[Increment]]], batch_size: int, k: int,
                      exclude_seen: bool = True) -> list[WindowList]:
        """The reference loop's result (see :class:`Recommender`) in one XLA program per up to 512 steps.
        Python prepares every step's pairs with their contexts, negatives, and each window's users' contexts
        and seen items; the program then runs, in order, each step's update and each window's top-K."""
        if not self.cfg.xla:
            return super().learn_windows(windows, batch_size, k, exclude_seen)
        if not windows:
            return []
        self.maintain(windows[0][0])
        L = self.cfg.history
        parts = {name: [] for name in ("neg", "list_r", "list_w", "excl_rec", "excl_item")}
        all_groups, grp_end, pair_end, rec_end, excl_end, visible, due = [], [], [], [], [], [], []
        n_pairs = n_recs = n_excl = 0
        version, step0 = self.version, self.steps
        for window_end, increments, chunk, frozen, last in self.window_steps(windows, batch_size):
            step = self.steps
            live = None      # the rows this step's negatives are drawn from (None: no pairs, no negatives)
            if frozen:
                self.observe(chunk)
            else:
                groups = self._pairs(chunk, step, protect_from=step0)
                self.steps += 1
                self._grow()    # the counts must have room for this step's items before they are counted
                live = self.items.live_rows() if groups else None
                all_groups += groups       # the call's groups, made arrays once below
                n_pairs += sum(len(items) for *_, items, _ in groups)
                version += bool(chunk)    # as in learn_many
            parts["neg"].append(live)
            grp_end.append(len(all_groups))
            pair_end.append(n_pairs)
            if last:
                users = list(dict.fromkeys(inc.user_id for inc in increments))
                for user in users:
                    r, w = self.history.context(user)
                    parts["list_r"].append(r)
                    parts["list_w"].append(w)
                    seen = self._seen_rows(user, exclude_seen)
                    if len(seen):
                        parts["excl_rec"].append(np.full(len(seen), n_recs, np.int32))
                        parts["excl_item"].append(seen)
                        n_excl += len(seen)
                    due.append((user, window_end, version))
                    n_recs += 1
            rec_end.append(n_recs)
            excl_end.append(n_excl)
            visible.append(step - step0)
        self._grow()
        self._init_assigned()    # once for the call's new rows: the program below is the first to read them
        born = self._item_born(self.capacity(), step0)
        stack = lambda name, dtype: (np.stack(parts[name]).astype(dtype, copy=False) if parts[name]  # noqa: E731
                                     else np.zeros((0, L), dtype))
        cat = lambda name, dtype: (np.concatenate(parts[name]).astype(dtype, copy=False) if parts[name]  # noqa: E731
                                   else np.zeros(0, dtype))
        grp_r, grp_w, pair_grp, items, weights = self._step_arrays(all_groups)
        negatives = self._negatives(parts["neg"])
        # The call's changed rows and counted cells for the next export, noted once: rows stay put within a call
        # (protect_from), and the export takes the set of them, whatever order they were noted in
        self._note_changed(grp_r, grp_w, pair_grp, items, weights, negatives)
        work = _Work(grp_r, grp_w, np.asarray(grp_end, np.int32), pair_grp, items, weights, np.asarray(pair_end, np.int32),
                     negatives,
                     stack("list_r", np.int32), stack("list_w", np.float32), np.asarray(rec_end, np.int32),
                     cat("excl_rec", np.int32), cat("excl_item", np.int32), np.asarray(excl_end, np.int32),
                     np.asarray(visible, np.int32))
        values, indices = self._run(work, born, min(k, self.capacity()))
        self.version = version
        return self._window_lists(due, values, indices)

    def _run(self, work: _Work, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The call's steps through the compiled program, in parts that fit its fixed shapes; a step with more
        pairs than the largest block goes through the plain graph path (same math)."""
        out_v, out_i = [], []
        sizes = np.diff(work.pair_end, prepend=0)
        s0, n_steps = 0, len(work.pair_end)
        with tf.device(self.device):
            if n_steps == 0:     # compile only
                self._xla_part(work, item_born, k)
            while s0 < n_steps:
                s1 = xb.span(sizes, (work.pair_end, work.rec_end, work.excl_end), (XLA_PAIRS, XLA_LISTS, XLA_EXCL), s0,
                             largest=BLOCKS[-1])
                part = self._xla_part if s1 > s0 else self._plain_part
                s1 = max(s1, s0 + 1)
                v, i = part(work.part(s0, s1), item_born, k)
                out_v.append(v)
                out_i.append(i)
                s0 = s1
        if not out_v:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        return np.concatenate(out_v), np.concatenate(out_i)

    def _plain_part(self, w: _Work, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One step without the compiled program: its update, then its lists."""
        if len(w.item):
            self._train_fn(w.grp_rows, w.grp_w, w.pair_grp, w.item, w.weight, w.neg[0])   # and counts
        scores = self._scores_fn(w.list_rows, w.list_w).numpy()
        scores[:, item_born > w.visible[0]] = -np.inf
        scores[w.excl_rec, w.excl_item] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), top.astype(np.int32)

    def _xla_part(self, w: _Work, item_born: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        pad = xb.pad
        n_lists = len(w.list_rows)
        list_excl_end = np.cumsum(np.bincount(w.excl_rec, minlength=n_lists)[:n_lists]).astype(np.int32)
        values, indices = self._xla_program(k)(*(tf.convert_to_tensor(a) for a in (
            pad(w.grp_rows, XLA_PAIRS_PAD), pad(w.grp_w, XLA_PAIRS_PAD), pad(w.grp_end, XLA_STEPS),
            pad(w.pair_grp, XLA_PAIRS_PAD), pad(w.item, XLA_PAIRS_PAD),
            pad(w.weight, XLA_PAIRS_PAD), pad(w.pair_end, XLA_STEPS), pad(w.neg, XLA_STEPS),
            pad(w.rec_end, XLA_STEPS), pad(w.visible, XLA_STEPS), np.int32(len(w.pair_end)),
            pad(w.list_rows, XLA_LISTS_PAD), pad(w.list_w, XLA_LISTS_PAD), pad(list_excl_end, XLA_LISTS_PAD),
            pad(w.excl_rec, XLA_EXCL_PAD), pad(w.excl_item, XLA_EXCL_PAD), item_born)))
        return values.numpy()[:n_lists], indices.numpy()[:n_lists]

    def _xla_program(self, k: int):
        if k in self._xla_calls:
            return self._xla_calls[k]
        L, M, cap = self.cfg.history, self.cfg.sequence_negatives, self.capacity()
        take, start, bucket, once = xb.take, xb.start, xb.bucket, xb.once
        m = self.memory_size

        def program(grp_rows, grp_w, grp_end, pair_grp, item, weight, pair_end, neg, rec_end, visible, n_steps, list_rows, list_w,
                    list_excl_end, excl_rec, excl_item, item_born):
            def contexts(a, size):
                """Rows and weights of the contexts of pairs ``a .. a + size``."""
                groups = take(pair_grp, a, size)
                return tf.gather(grp_rows, groups), tf.gather(grp_w, groups)

            def learn(size, s, a, n, features):
                def run():
                    mask = tf.cast(tf.range(size) < n, tf.float32)
                    self._train(*contexts(a, size), take(item, a, size), take(weight, a, size) * mask, tf.gather(neg, s),
                                features[:size])
                    return ()
                return run

            def count(size, a, n):
                def run():
                    mask = tf.cast(tf.range(size) < n, tf.float32)
                    self._count(*contexts(a, size), take(item, a, size), take(weight, a, size) * mask)
                    return ()
                return run

            def features_of(s, memory, features):
                """Step ``s``'s pair features into the first rows of ``features``, from the counts as they are now:
                after step ``s - 1`` counted, before step ``s`` learns. First each group's memory at the step's
                shared negatives (into ``memory``), then each pair's: its item's, and its group's at the negatives.
                Only those cells are gathered, not the groups' rows over every item (13 % less model time on
                ML-1M, the same lists). They are read here, after the count, as the lists read them: XLA copies the
                whole count matrix on every step when it is read before the same step's count."""
                if not m:
                    return memory, features
                at = tf.minimum(s, XLA_STEPS - 1)
                g0, a = start(grp_end, at), start(pair_end, at)
                n_grp = tf.where(s < n_steps, tf.gather(grp_end, at) - g0, 0)
                n = tf.where(s < n_steps, tf.gather(pair_end, at) - a, 0)
                chosen = tf.where(n_grp > 0, bucket(n_grp, GROUP_BLOCKS), -1)
                for j, size in enumerate(GROUP_BLOCKS):
                    def rows(mem, size=size):
                        new = self._memory_at(take(grp_rows, g0, size), take(grp_w, g0, size),
                                              tf.gather(neg, at)[None, :])
                        return (tf.tensor_scatter_nd_update(mem, tf.range(size)[:, None], new),)
                    memory, = once(chosen == j, rows, memory)
                chosen = tf.where(n > 0, bucket(n, BLOCKS), -1)
                for j, size in enumerate(BLOCKS):
                    def pairs(f, size=size):
                        group = tf.clip_by_value(take(pair_grp, a, size) - g0, 0, GROUP_BLOCKS[-1] - 1)
                        new = self._pair_features(memory, group, *contexts(a, size), take(item, a, size))
                        return (tf.tensor_scatter_nd_update(f, tf.range(size)[:, None], new),)
                    features, = once(chosen == j, pairs, features)
                return memory, features

            def score(rows, weights, s):
                scores = self._scores(rows, weights)
                return tf.where(item_born[None, :] <= tf.gather(visible, s), scores, float("-inf"))

            def step(s, out_v, out_i, memory, features):
                a = start(pair_end, s)
                n = tf.gather(pair_end, s) - a
                chosen = tf.where(n > 0, bucket(n, BLOCKS), -1)
                for j, size in enumerate(BLOCKS):
                    once(chosen == j, learn(size, s, a, n, features))
                for j, size in enumerate(BLOCKS):
                    once(chosen == j, count(size, a, n))
                out_v, out_i = xb.list_step(s, rec_end, lambda r, size: score(take(list_rows, r, size),
                                                                              take(list_w, r, size), s),
                                            list_excl_end, excl_rec, excl_item, cap, k, out_v, out_i)
                return (s + 1, out_v, out_i, *features_of(s + 1, memory, features))

            first = features_of(tf.constant(0), tf.zeros([GROUP_BLOCKS[-1], M]), tf.zeros([BLOCKS[-1], 1 + M]))
            return xb.step_loop(step, n_steps, k, *first)

        i32 = lambda *shape: tf.TensorSpec(shape, tf.int32)  # noqa: E731
        f32 = lambda *shape: tf.TensorSpec(shape, tf.float32)  # noqa: E731
        P, R, E = XLA_PAIRS_PAD, XLA_LISTS_PAD, XLA_EXCL_PAD
        compiled = tf.function(program, jit_compile=True, autograph=False, input_signature=[
            i32(P, L), f32(P, L), i32(XLA_STEPS), i32(P), i32(P), f32(P), i32(XLA_STEPS), i32(XLA_STEPS, M), i32(XLA_STEPS), i32(XLA_STEPS),
            i32(), i32(R, L), f32(R, L), i32(R), i32(E), i32(E), i32(cap)])
        self._xla_calls[k] = compiled.get_concrete_function()
        return self._xla_calls[k]

    # ---- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        n = self.items.high
        return {"item_context_emb": self.E_in.numpy()[:n], "item_emb": self.E_out.numpy()[:n],
                "item_bias": self.b.numpy()[:n], **{f"adagrad_{j}": a.numpy()[:n] for j, a in enumerate(self.acc)},
                "counters": np.asarray([self.version, self.steps, self._next_expiry], np.int64),
                **self._counts().state(),
                "memory_weight": np.concatenate([self.theta.numpy(), self.acc_theta.numpy()]),
                **self.users.state("users"), **self.items.state("items"), **pack_seen(self.seen),
                **self.history.state(),
                "rng_state": np.frombuffer(json.dumps({k: r.bit_generator.state for k, r in self._rngs.items()}).encode(),
                                           np.uint8),
                "config": np.frombuffer(json.dumps(self.cfg.__dict__).encode(), np.uint8)}

    @classmethod
    def from_state(cls, z, cfg: ModelConfig) -> "SequenceModel":
        model = cls(cfg)
        model.users = IdTable.from_state(z, "users", cfg.max_users, cfg.admit_after)
        model.items = IdTable.from_state(z, "items", cfg.max_items, cfg.admit_after)
        model._grow()
        n = model.items.high
        with tf.device(model.device):
            for var, name in zip(model._variables(), ("item_context_emb", "item_emb", "item_bias", "adagrad_0",
                                                      "adagrad_1", "adagrad_2")):
                var[:n].assign(z[name])
        m = model.memory_size
        if m:
            counts = TransitionCounts(m, m, cfg.transition_alpha, cfg.transition_symmetric)
            counts.load(z)      # cut to this model's size; converted if saved with another transition_symmetric
            model._assign_counts(counts)
            model.theta.assign(z["memory_weight"][:1])
            model.acc_theta.assign(z["memory_weight"][1:])
        model.seen = unpack_seen(z)
        model.history = UserHistory.from_state(z, cfg.history, cfg.history_decay)
        model.version, model.steps, model._next_expiry = (int(x) for x in z["counters"])
        for name, state in json.loads(bytes(z["rng_state"]).decode()).items():
            if name in model._rngs:     # states saved before item rows were drawn from their ids had more streams
                model._rngs[name].bit_generator.state = state
        return model
