"""Shared pieces of the models' compiled learn-and-list loops (XLA programs with fixed shapes).

A model call runs many small sequential steps (each window's micro-batches, then its lists), so it
is compiled once per table capacity and ``k`` as one XLA program whose inputs have fixed, padded
lengths. These helpers are what every model kind's program needs besides its own math: picking the
steps that fit the shapes, padding, slicing by gathers, one-trip loops instead of conditionals, and the
listing block (scores -> seen-item exclusions -> top-K) with its output rows.

Indexing is written as gathers throughout: XLA takes the position of a slice as a compile-time
constant, which would compile the program again for every new input.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

# A call's steps go through the program in parts of at most these many steps, pairs, lists and exclusions.
# Inside, a step's pairs are one static block of the smallest size in PAIR_BLOCKS that holds them (padding
# masked), lists go in blocks of LIST_BLOCKS, seen-item exclusions in blocks of EXCL_BLOCK. A step bigger
# than the largest block goes through the model's plain graph path instead (same result).
XLA_STEPS, XLA_PAIRS, XLA_LISTS, XLA_EXCL = 512, 4096, 1024, 16384
PAIR_BLOCKS = (8, 64, 512, 2048)
LIST_BLOCKS = (1, 4, 16)
EXCL_BLOCK = 256
# Padded input lengths: room for a whole block past the last real entry.
XLA_PAIRS_PAD = XLA_PAIRS + PAIR_BLOCKS[-1]
XLA_LISTS_PAD = XLA_LISTS + LIST_BLOCKS[-1]
XLA_EXCL_PAD = XLA_EXCL + EXCL_BLOCK
NEG_INF = float("-inf")


def pad(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` followed by zeros up to length ``n`` (first axis)."""
    out = np.zeros((n,) + a.shape[1:], a.dtype)
    out[: len(a)] = a
    return out


def span(sizes: np.ndarray, ends: Sequence[np.ndarray], caps: Sequence[int], s0: int,
         largest: int = PAIR_BLOCKS[-1]) -> int:
    """End of the longest run of steps from ``s0`` that fits the program: at most XLA_STEPS steps, each
    ``ends[j]`` (cumulative end offsets per step) growing by at most ``caps[j]``, and no step whose size
    exceeds ``largest``, the largest pair block the program has (the run stops before it; ``s0`` itself if
    it is such a step).

    >>> span(np.array([3, 3, 5000, 1]), [np.array([3, 6, 5006, 5007])], [4096], 0)
    2
    """
    s1 = min(len(ends[0]), s0 + XLA_STEPS)
    for e, cap in zip(ends, caps):
        base = int(e[s0 - 1]) if s0 else 0
        s1 = min(s1, int(np.searchsorted(e, base + cap, side="right")))
    too_big = np.flatnonzero(sizes[s0:s1] > largest)
    return s0 + int(too_big[0]) if too_big.size else s1


def start(ends, j):
    """Where element ``j``'s range begins: ``ends[j - 1]``, or 0."""
    return tf.where(j > 0, tf.gather(ends, tf.maximum(j - 1, 0)), 0)


def take(x, at, size: int):
    """``x[at:at + size]`` as a gather (``size`` static)."""
    return tf.gather(x, at + tf.range(size))


def bucket(n, blocks: Sequence[int]):
    """Index of the smallest block that holds ``n`` (the last one if none does)."""
    return tf.reduce_sum(tf.cast(n > tf.constant(blocks[:-1]), tf.int32))


def once(flag, fn: Callable, *state):
    """``fn(*state)`` if flag, else ``state``: a loop of at most one trip. XLA updates the tables and outputs
    of a loop in place, where a conditional (tf.cond / switch_case) copies them."""
    _, *state = tf.while_loop(lambda go, *_: go, lambda go, *st: (False, *fn(*st)), [flag, *state])
    return state


def step_loop(step: Callable, n_steps, k: int, *carry):
    """``step(s, out_v, out_i, *carry)`` for s = 0 .. n_steps - 1, strictly in order (``carry``: what a step hands
    the next); returns the top-``k`` values and item rows of every list the steps wrote (-inf / 0 in rows no
    list wrote)."""
    _, out_v, out_i, *_ = tf.while_loop(
        lambda s, ov, oi, *_: s < n_steps, step,
        [tf.constant(0), tf.fill([XLA_LISTS_PAD, k], NEG_INF), tf.zeros([XLA_LISTS_PAD, k], tf.int32), *carry],
        parallel_iterations=1)
    return out_v, out_i


def list_step(s, rec_end, scores_of: Callable, list_excl_end, excl_rec, excl_item, cap: int, k: int, out_v, out_i):
    """Step ``s``'s lists: for each block of its list rows, ``scores_of(r, size)`` gives ``[size, cap]`` scores
    (-inf for items that may not be listed); the rows' seen items are set to -inf; the top-``k`` values and
    item rows go to rows ``r..`` of ``out_v`` / ``out_i``."""
    list_block = LIST_BLOCKS[-1]
    r1 = tf.gather(rec_end, s)

    def listing(size, r, n):
        def run(ov, oi):
            scores = tf.concat([scores_of(r, size), tf.zeros([size, 1])], 1)   # a spare column takes padded exclusions
            e1 = tf.gather(list_excl_end, r + tf.minimum(n, size) - 1)

            def exclude(e, sc):
                ok = e + tf.range(EXCL_BLOCK) < e1
                at = tf.stack([tf.where(ok, take(excl_rec, e, EXCL_BLOCK) - r, 0),
                               tf.where(ok, take(excl_item, e, EXCL_BLOCK), cap)], 1)
                return e + EXCL_BLOCK, tf.tensor_scatter_nd_update(sc, at, tf.fill([EXCL_BLOCK], NEG_INF))
            _, scores = tf.while_loop(lambda e, sc: e < e1, exclude, [start(list_excl_end, r), scores])
            top = tf.math.top_k(scores[:, :cap], k=k)
            at = (r + tf.range(size))[:, None]   # rows past the valid ones are rewritten by later blocks
            return (tf.tensor_scatter_nd_update(ov, at, top.values), tf.tensor_scatter_nd_update(oi, at, top.indices))
        return run

    def lists(r, ov, oi):
        n = r1 - r
        chosen = bucket(n, LIST_BLOCKS)
        for j, size in enumerate(LIST_BLOCKS):
            ov, oi = once(chosen == j, listing(size, r, n), ov, oi)
        return r + tf.minimum(n, list_block), ov, oi

    _, out_v, out_i = tf.while_loop(lambda r, ov, oi: r < r1, lists, [start(rec_end, s), out_v, out_i])
    return out_v, out_i
