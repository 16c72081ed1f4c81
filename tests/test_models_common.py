"""One set of checks run against every model kind (River's ``checks``), then what is particular to the
sequence model and the baselines. Fast: small random data, no JVM."""
import os

import numpy as np
import pytest

from freshet.conf.settings import Config, ModelConfig
from freshet.models.base import Recommender
from freshet.models.history import UserHistory
from freshet.models.increments import Increment
from freshet.models.popularity import Popularity
from freshet.models.transition import Transition
from freshet.udfs.recommend_online import model_class

from tests.test_model import inc, random_windows

KINDS = ["bpr", "sequence", "transition", "popularity", "recent-popularity"]


def cfg_for(kind: str, **over) -> ModelConfig:
    base = dict(kind=kind, dim=8, initial_capacity=4, batch_size=4, negatives=4, sequence_negatives=16, seed=11,
                history=5, popularity_half_life_ms=120_000 if kind == "recent-popularity" else 0)
    return ModelConfig(**{**base, **over})


def build(kind: str, **over) -> Recommender:
    cfg = cfg_for(kind, **over)
    return model_class(Config(model=cfg))(cfg)


def key(lists):
    return [(w.user_id, w.window_end, w.model_version, w.rec.items) for w in lists]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_lists(kind):
    windows = random_windows(2)
    assert key(build(kind).learn_windows(windows, 4, 5)) == key(build(kind).learn_windows(windows, 4, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip_continues_exactly(kind):
    windows = random_windows(4)
    m = build(kind)
    m.learn_windows(windows[:15], 4, 5)
    r = type(m).from_bytes(m.to_bytes(), m.cfg)
    assert r.version == m.version
    rest_r, rest_m = r.learn_windows(windows[15:], 4, 5), m.learn_windows(windows[15:], 4, 5)
    assert key(rest_r) == key(rest_m)
    np.testing.assert_allclose([s for w in rest_r for s in w.rec.scores], [s for w in rest_m for s in w.rec.scores],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_is_distinct_unseen_and_sorted(kind):
    m = build(kind)
    m.learn_windows(random_windows(1), 4, 5)
    lists = m.learn_windows([(10 ** 7, [inc("target", ["i1", "i2", "i3"], end=10 ** 7)])], 4, 10)
    rec = lists[0].rec
    assert len(rec.items) == 10 and len(set(rec.items)) == 10
    assert not {"i1", "i2", "i3"} & set(rec.items)
    assert all(a >= b for a, b in zip(rec.scores, rec.scores[1:]))


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_mutated(kind):
    windows = random_windows(6)
    before = repr(windows)
    build(kind).learn_windows(windows, 4, 5)
    assert repr(windows) == before


@pytest.mark.parametrize("kind", ["bpr", "sequence"])
def test_compiled_loop_gives_the_reference_loop_result(kind):
    windows = random_windows(3)
    ref = build(kind)
    expected = Recommender.learn_windows(ref, windows, 4, 5)
    fused = build(kind)
    got = fused.learn_windows(windows[:10], 4, 5) + fused.learn_windows(windows[10:], 4, 5)
    assert key(got) == key(expected)
    np.testing.assert_allclose([s for w in got for s in w.rec.scores], [s for w in expected for s in w.rec.scores],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts the process's memory maps (Linux)")
def test_compiled_programs_do_not_pile_up_memory_maps():
    """XLA's thunk runtime maps ~380 regions per compiled program and keeps them: a process that compiles a few
    hundred (a tune grid, this suite) crashed at the kernel's 65,530 maps (models/__init__.py picks the classic
    runtime). Each model here compiles its own programs (a table grows: a new one)."""
    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    windows = random_windows(3)
    build("sequence").learn_windows(windows, 4, 5)          # TensorFlow's and XLA's own start-up maps
    before = maps()
    for kind in ("bpr", "sequence", "bpr", "sequence"):
        build(kind).learn_windows(windows, 4, 5)
    assert maps() - before < 4 * 100, "XLA_FLAGS: " + os.environ.get("XLA_FLAGS", "")


# ---- the sequence model ---------------------------------------------------------------------------
def test_sequence_loss_falls_when_the_same_batch_repeats():
    m = build("sequence", sequence_learning_rate=0.3)
    history = [inc(f"u{j}", [f"i{j}"], end=60_000) for j in range(8)]
    m.learn_many(history)                              # contexts: each user has seen i{j}
    batch = [inc(f"u{j}", [f"i{j + 10}"], end=120_000) for j in range(8)]
    losses = []
    for _ in range(30):
        state = m.history.state()
        losses.append(m.learn_many(batch).loss)
        m.history = UserHistory.from_state(state, m.cfg.history, m.cfg.history_decay)   # same contexts again
    assert losses[0] > 2.0                             # ~log(17): one positive among 16 negatives
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_sequence_new_ids_grow_the_tables():
    m = build("sequence")
    assert m.capacity() == 4
    m.learn_many([inc(f"u{j}", [f"i{j}"]) for j in range(10)])
    assert (m.n_users, m.n_items, m.capacity()) == (10, 10, 16)
    assert m.version == 1                             # histories changed (no pair yet: nobody had a context)
    m.learn_many([inc("u0", ["i999"], end=120_000)])  # a known user with history, a new item: one pair
    assert m.n_items == 11 and m.version == 2


def test_sequence_lists_follow_what_the_user_just_did():
    """Items that followed "a" are listed after "a"; after "x", what followed "x" — the same user."""
    m = build("sequence", sequence_learning_rate=0.3, history=1)
    windows, end = [], 0
    for rep in range(40):
        for j in range(6):
            end += 60_000
            first, then = ("a", f"b{rep % 2}") if j % 2 else ("x", f"y{rep % 2}")
            windows.append((end, [inc(f"u{rep}-{j}", [first], end=end)]))
            end += 60_000
            windows.append((end, [inc(f"u{rep}-{j}", [then], end=end)]))
    m.learn_windows(windows, 4, 3)
    after_a = m.learn_windows([(end + 60_000, [inc("fresh", ["a"], end=end + 60_000)])], 4, 2)[0].rec.items
    after_x = m.learn_windows([(end + 120_000, [inc("fresh", ["x"], end=end + 120_000)])], 4, 2)[0].rec.items
    assert set(after_a) == {"b0", "b1"} and set(after_x) == {"y0", "y1"}


def test_sequence_history_is_bounded_and_expires_with_the_user():
    m = build("sequence", history=3, expire_after_ms=120_000)
    m.learn_windows([(60_000, [inc("u", [f"i{j}" for j in range(10)], end=60_000)])], 4, 5)
    assert len(m.history.context("u")[0]) == 3
    m.learn_windows([(10 * 60_000, [inc("v", ["z"], end=10 * 60_000)])], 4, 5)
    assert "u" not in m.history and "u" not in m.seen


def test_history_contexts_are_kept_until_the_history_changes():
    h = UserHistory(length=3, decay=0.5)
    h.append("u", [4], [1.0])
    first = h.context("u")
    assert h.context("u") is first                      # asked again: the kept arrays
    with pytest.raises(ValueError):
        first[1][0] = 9.0                               # read-only: a caller cannot change what others get
    h.append("u", [5], [2.0])
    assert h.context("u")[0].tolist() == [5, 4, 0] and h.context("u")[1].tolist() == [2.0, 0.5, 0.0]
    assert first[0].tolist() == [4, 0, 0]               # what a caller already holds stays as it was
    h.drop_rows({5})
    assert h.context("u")[0].tolist() == [4, 0, 0] and h.context("u")[1].tolist() == [0.5, 0.0, 0.0]
    h.forget("u")
    assert h.context("u")[1].tolist() == [0.0, 0.0, 0.0]


def test_history_keeps_a_bounded_number_of_contexts(monkeypatch):
    import freshet.models.history as history
    monkeypatch.setattr(history, "CONTEXTS_KEPT", 2)
    h = UserHistory(length=2, decay=0.5)
    for user in ("a", "b", "c", "d", "e"):
        h.append(user, [1], [1.0])
        h.context(user)
        assert len(h._ctx) <= 2
    assert h.context("a")[0].tolist() == [1, 0]         # computed again when asked


def test_sequence_memory_bound_evicts_items_from_histories():
    m = build("sequence", max_items=6)
    for w in range(1, 30):
        m.learn_windows([(w * 60_000, [inc(f"u{w % 3}", [f"i{w}", f"i{w + 1}"], end=w * 60_000)])], 4, 5)
        assert m.n_items <= 6
        live = set(m.items.live_rows().tolist())
        for user in ("u0", "u1", "u2"):
            rows, weights = m.history.context(user)
            assert set(rows[weights > 0].tolist()) <= live


def test_sequence_compiled_steps_of_many_groups_match_the_reference():
    """Steps of 1 to 16 increments with 1 to 4 items each: every group and pair block of the program, the
    memory features read in the program between steps, against the reference loop."""
    rng = np.random.default_rng(5)
    windows = [(60_000 * (w + 1), [inc(f"u{u}", [f"i{x}" for x in rng.choice(40, rng.integers(1, 5), replace=False)],
                                       end=60_000 * (w + 1)) for u in rng.choice(30, rng.integers(1, 17), replace=False)])
               for w in range(12)]
    compiled = build("sequence", batch_size=16).learn_windows(windows, 16, 5)
    ref = Recommender.learn_windows(build("sequence", batch_size=16), windows, 16, 5)
    assert key(compiled) == key(ref)
    np.testing.assert_allclose([s for w in compiled for s in w.rec.scores], [s for w in ref for s in w.rec.scores],
                               rtol=1e-4, atol=1e-5)


def test_sequence_oversize_step_goes_through_the_plain_path():
    from freshet.models.xla_blocks import PAIR_BLOCKS
    heavy = [inc(f"h{j}", [f"i{x}" for x in range(j, j + 700)], end=60_000) for j in range(4)]
    again = [inc(f"h{j}", [f"k{x}" for x in range(j, j + 700)], end=120_000) for j in range(4)]   # 2,800 pairs
    assert sum(len(i.items) for i in again) > PAIR_BLOCKS[-1]
    windows = [(60_000, heavy), (120_000, again)] + random_windows(8)[3:6]
    over = dict(batch_size=64, initial_capacity=4096)
    compiled = build("sequence", **over).learn_windows(windows, 64, 5)
    ref = Recommender.learn_windows(build("sequence", **over), windows, 64, 5)
    assert key(compiled) == key(ref)


# ---- the baselines ----------------------------------------------------------------------------------
def test_transition_counts_what_followed_the_users_last_items():
    m = Transition(cfg_for("transition", history=1, transition_popularity=0.0, transition_symmetric=0.0))
    for u in range(3):
        m.learn_many([inc(f"u{u}", ["a"], end=60_000)])
        m.learn_many([inc(f"u{u}", ["b"], end=120_000)])
    m.learn_many([inc("v", ["c"], end=60_000)])
    m.learn_many([inc("v", ["a"], end=120_000)])
    assert m.recommend(["v"], 1)[0].items == ["b"]     # v just had "a"; "c" is seen
    assert m.T[m.pop.items.rows["a"], m.pop.items.rows["b"]] == 3.0


def test_transition_beyond_its_matrix_bound_items_are_popularity_only():
    m = Transition(cfg_for("transition", transition_max_items=4))
    m.learn_windows([(w * 60_000, [inc("u", [f"i{w}"], end=w * 60_000)]) for w in range(1, 12)], 4, 3)
    assert m.T.shape == (4, 4) and m.n_items == 11
    assert len(m.recommend(["u2"], 3)[0].items) == 3


def test_recent_popularity_forgets_with_its_half_life():
    m = Popularity(cfg_for("recent-popularity", popularity_half_life_ms=60_000))
    m.learn_many([Increment("a", 60_000, ("old",), (8.0,), (8,), 8)])
    m.learn_many([Increment("b", 60_000 + 4 * 60_000, ("new",), (1.0,), (1,), 1)])   # "old" now weighs 8/16
    rec = m.recommend(["c"], 2)[0]
    assert rec.items == ["new", "old"] and rec.scores == pytest.approx([1.0, 0.5])
    for step in range(2, 200):   # far past the rescaling point: still finite and ordered
        m.learn_many([Increment("b", 60_000 * step * 10, ("new",), (1.0,), (1,), 1)])
    assert np.isfinite(m.current_counts()).all() and m.recommend(["c"], 1)[0].items == ["new"]


def test_sequence_without_memory_learns_and_round_trips():
    """model.sequence_memory_items: 0 is the plain FISM model: no count matrix, same loop, same state round trip."""
    windows = random_windows(9)
    m = build("sequence", sequence_memory_items=0)
    expected = Recommender.learn_windows(build("sequence", sequence_memory_items=0), windows[:15], 4, 5)
    assert key(m.learn_windows(windows[:15], 4, 5)) == key(expected)
    assert m.T.shape == (0,) and float(m.theta[0]) == 0.0
    r = type(m).from_bytes(m.to_bytes(), m.cfg)
    assert key(r.learn_windows(windows[15:], 4, 5)) == key(m.learn_windows(windows[15:], 4, 5))
