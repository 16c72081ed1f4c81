"""The online model: fast unit tests on small random data, no JVM."""
import json
import subprocess
import sys

import numpy as np
import pytest

from freshet.conf.settings import ModelConfig
from freshet.models.base import Recommendation, Recommender, WindowList
from freshet.models.increments import Increment
from freshet.models.online_mf import OnlineMF


def inc(user, items, end=60_000, weight=1.0):
    return Increment(user, end, tuple(items), (weight,) * len(items), (1,) * len(items), len(items))


def random_windows(seed, n_windows=30, n_users=25, n_items=60):
    rng = np.random.default_rng(seed)
    windows = []
    for w in range(n_windows):
        incs = []
        for _ in range(rng.integers(0, 6)):
            items = list(dict.fromkeys(f"i{x}" for x in rng.integers(n_items, size=rng.integers(1, 5))))
            incs.append(inc(f"u{rng.integers(n_users)}", items, end=(w + 1) * 60_000))
        windows.append(((w + 1) * 60_000, incs))
    return windows


@pytest.fixture
def mcfg():
    return ModelConfig(kind="bpr", dim=8, initial_capacity=4, batch_size=4, negatives=4, seed=11)


def test_loss_falls_when_the_same_batch_repeats(mcfg):
    m = OnlineMF(ModelConfig(**{**mcfg.__dict__, "learning_rate": 0.3}))
    batch = [inc(f"u{j}", [f"i{j}", f"i{j + 1}"]) for j in range(8)]
    losses = [m.learn_many(batch).loss for _ in range(40)]
    assert losses[0] > 0.6                      # ~log(2) at random initialisation
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_new_ids_grow_the_tables(mcfg):
    m = OnlineMF(mcfg)
    assert m.capacity() == (4, 4)
    m.learn_many([inc(f"u{j}", [f"i{j}"]) for j in range(10)])
    assert (m.n_users, m.n_items) == (10, 10)
    assert m.capacity() == (16, 16)
    m.learn_many([inc("u0", ["i999"])])        # known user, new item: still trains and recommends
    assert m.n_items == 11 and m.version == 2


def test_top_k_is_k_distinct_unseen_items_with_non_increasing_scores(mcfg):
    m = OnlineMF(mcfg)
    for w in random_windows(1):
        for b in [w[1]] if w[1] else []:
            m.learn_many(b)
    m.learn_many([inc("target", ["i1", "i2", "i3"])])
    rec = m.recommend(["target"], k=10)[0]
    assert len(rec.items) == 10 and len(set(rec.items)) == 10
    assert not {"i1", "i2", "i3"} & set(rec.items)
    assert all(a >= b for a, b in zip(rec.scores, rec.scores[1:]))
    with_seen = m.recommend(["target"], k=m.n_items, exclude_seen=False)[0]
    assert len(with_seen.items) == m.n_items


def test_unknown_user_gets_a_popularity_list(mcfg):
    m = OnlineMF(mcfg)
    m.learn_many([inc(f"u{j}", ["hit"]) for j in range(6)] + [inc("u9", ["rare"])])
    assert len(m.recommend(["stranger"], k=2)[0].items) == 2


def test_same_seed_same_result(mcfg):
    runs = []
    for _ in range(2):
        m = OnlineMF(mcfg)
        runs.append([wl.rec for wl in m.learn_windows(random_windows(2), 4, 5)])
    assert runs[0] == runs[1]


def test_fused_windows_give_the_reference_loop_result(mcfg):
    windows = random_windows(3)
    ref, fused = OnlineMF(mcfg), OnlineMF(mcfg)
    expected = Recommender.learn_windows(ref, windows, mcfg.batch_size, 5)
    got = fused.learn_windows(windows[:10], mcfg.batch_size, 5) + fused.learn_windows(windows[10:], mcfg.batch_size, 5)
    assert [(w.user_id, w.window_end, w.model_version, w.rec.items) for w in got] == \
           [(w.user_id, w.window_end, w.model_version, w.rec.items) for w in expected]
    np.testing.assert_allclose(fused._V.numpy(), ref._V.numpy(), atol=1e-6)
    assert fused.version == ref.version


def test_lists_only_use_items_known_when_the_window_closed(mcfg):
    m = OnlineMF(mcfg)
    lists = m.learn_windows([(60_000, [inc("u1", ["a"]), inc("u2", ["b"])]), (120_000, [inc("u3", ["late-item"])])],
                            mcfg.batch_size, 5)
    first = [wl for wl in lists if wl.window_end == 60_000]
    assert all("late-item" not in wl.rec.items for wl in first)
    assert {wl.user_id: wl.rec.items for wl in first} == {"u1": ["b"], "u2": ["a"]}


def test_save_and_restore_round_trip(mcfg, tmp_path):
    m = OnlineMF(mcfg)
    m.learn_windows(random_windows(4), 4, 5)
    path = m.save(tmp_path / "model")
    r = OnlineMF.restore(path, mcfg)
    assert (r.version, r.n_users, r.n_items, r.seen) == (m.version, m.n_users, m.n_items, m.seen)
    users = list(m.users.rows)[:5]
    assert r.recommend(users, 5) == m.recommend(users, 5)
    more = random_windows(5)
    assert [w.rec for w in r.learn_windows(more, 4, 5)] == [w.rec for w in m.learn_windows(more, 4, 5)]


def test_inputs_are_not_mutated(mcfg):
    windows = random_windows(6)
    before = repr(windows)
    OnlineMF(mcfg).learn_windows(windows, 4, 5)
    assert repr(windows) == before


def test_models_never_import_pyflink():
    code = ("import sys, freshet.models.online_mf, freshet.models.evaluation, freshet.models.events; "
            "sys.exit(1 if any(m.startswith('pyflink') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_frozen_model_stops_learning_but_keeps_filtering_seen_items(mcfg):
    windows = random_windows(7)
    cutoff = windows[15][0]
    ref = OnlineMF(ModelConfig(**{**mcfg.__dict__, "freeze_after_ms": cutoff}))
    fused = OnlineMF(ModelConfig(**{**mcfg.__dict__, "freeze_after_ms": cutoff}))
    expected = Recommender.learn_windows(ref, windows, mcfg.batch_size, 5)
    got = fused.learn_windows(windows, mcfg.batch_size, 5)
    assert [(w.user_id, w.model_version, w.rec.items) for w in got] == \
           [(w.user_id, w.model_version, w.rec.items) for w in expected]
    frozen_versions = {w.model_version for w in got if w.window_end > cutoff}
    assert len(frozen_versions) == 1                       # no update after the cutoff
    after = fused.learn_windows([(10**9, [inc("u1", ["i1"]), inc("brand-new", ["i2"])])], mcfg.batch_size, 5)
    assert "brand-new" not in fused.users.rows and all("i1" not in w.rec.items or w.user_id != "u1" for w in after)


def test_popularity_baseline_ranks_by_cumulative_weight_and_filters_seen(mcfg):
    from freshet.models.popularity import Popularity
    m = Popularity(mcfg)
    lists = m.learn_windows([(60, [inc("a", ["x", "y"]), inc("b", ["x"])]), (120, [inc("c", ["z"])])], 4, 3)
    by_user = {(w.user_id, w.window_end): w.rec.items for w in lists}
    assert by_user[("a", 60)] == [] and by_user[("b", 60)] == ["y"]
    assert by_user[("c", 120)] == ["x", "y"]


def test_synced_serving_lists_use_the_parameters_of_the_last_sync(mcfg):
    windows = random_windows(8)                   # windows end every 60 s
    every = 5 * 60_000
    synced = OnlineMF(ModelConfig(**{**mcfg.__dict__, "sync_every_ms": every}))
    got = synced.learn_windows(windows, mcfg.batch_size, 5)
    # A model trained only up to the last sync point, serving its newest parameters, must give the
    # same scores for the lists between syncs (same items where the seen filter allows).
    sync_end = 10 * 60_000
    upto = OnlineMF(mcfg)
    upto.learn_windows([w for w in windows if w[0] <= sync_end], mcfg.batch_size, 5)
    between = [w for w in got if sync_end < w.window_end < sync_end + every and w.rec.items]
    assert between, "the random log must have lists between two syncs"
    for wl in between:
        assert wl.model_version == upto.version
        row = upto.users.get(wl.user_id)
        if row is None:
            continue
        fresh = dict(zip(*upto.recommend([wl.user_id], k=upto.n_items, exclude_seen=False)[0]))
        for item, score in zip(wl.rec.items, wl.rec.scores):
            assert score == pytest.approx(fresh[item], abs=1e-5)
    assert OnlineMF(mcfg).learn_windows(windows, 4, 5) != got   # syncing changes what is served


def test_fused_equals_reference_with_admission_and_expiry(mcfg):
    cfg = ModelConfig(**{**mcfg.__dict__, "admit_after": 2, "expire_after_ms": 8 * 60_000})
    windows = random_windows(9, n_windows=40)
    ref, fused = OnlineMF(cfg), OnlineMF(cfg)
    # expiry runs at the start of each call, so both get the same calls
    expected = [w for j in range(0, 40, 7) for w in Recommender.learn_windows(ref, windows[j:j + 7], cfg.batch_size, 5)]
    got = [w for j in range(0, 40, 7) for w in fused.learn_windows(windows[j:j + 7], cfg.batch_size, 5)]
    assert [(w.user_id, w.window_end, w.rec.items) for w in got] == \
           [(w.user_id, w.window_end, w.rec.items) for w in expected]
    assert fused.users.evictions > 0 and fused.items.evictions > 0   # the rules were exercised
    np.testing.assert_allclose(fused._V.numpy(), ref._V.numpy(), atol=1e-6)


def test_seen_arrays_match_the_seen_sets_through_capacity_evictions(mcfg):
    # few users who come back again and again (their seen rows are kept as growing arrays for the
    # exclusions) while the item table is full and evicts: the arrays must follow the sets exactly
    cfg = ModelConfig(**{**mcfg.__dict__, "max_items": 24})
    windows = random_windows(5, n_windows=60, n_users=4, n_items=80)
    kept, rebuilt = OnlineMF(cfg), OnlineMF(cfg)
    kept._seen_arrays.min_rows = 2               # arrays for nearly every user here
    got, expected, longest = [], [], 0
    for j in range(0, 60, 9):
        got += kept.learn_windows(windows[j:j + 9], cfg.batch_size, 5)
        rebuilt._seen_arrays.drop()               # every call builds the arrays afresh from the sets
        expected += rebuilt.learn_windows(windows[j:j + 9], cfg.batch_size, 5)
        for user, seen in kept.seen.items():
            assert sorted(kept._seen_arrays.view(user, seen).tolist()) == sorted(seen)
            longest = max(longest, len(seen))
    assert [(w.user_id, w.window_end, w.rec.items) for w in got] == \
           [(w.user_id, w.window_end, w.rec.items) for w in expected]
    assert kept.items.evictions > 0
    assert longest >= 8                          # the exclusions were long enough to matter


def test_admission_an_id_gets_its_own_row_after_n_events(mcfg):
    m = OnlineMF(ModelConfig(**{**mcfg.__dict__, "admit_after": 3}))
    m.learn_many([inc("u1", ["a", "b"])])            # u1: 2 events, a and b: 1 each
    assert m.users.get("u1") is None and m.items.get("a") is None and m.n_items == 0
    m.learn_many([inc("u1", ["a"]), inc("u2", ["a", "b", "c"])])
    assert m.users.get("u1") is not None and m.users.get("u2") is not None   # 3 events each
    assert m.items.get("a") is not None and m.items.get("b") is None          # a: 3 events, b: 2
    assert m.recommend(["u2"], k=5)[0].items == []   # u2 saw a; b and c are not admitted: nothing left
    assert m.version == 2                            # the fallback row learned from the early events


def test_expiry_evicts_ids_unseen_for_the_horizon_and_reuses_their_rows(mcfg):
    hour = 3_600_000
    m = OnlineMF(ModelConfig(**{**mcfg.__dict__, "expire_after_ms": hour}))
    m.learn_windows([(60_000, [inc("old", ["x", "y"])])], 4, 5)
    row_old, row_x = m.users.get("old"), m.items.get("x")
    m.learn_windows([(2 * hour, [inc("new", ["z"])])], 4, 5)
    assert m.users.get("old") is None and m.items.get("x") is None and "old" not in m.seen
    assert m.users.get("new") == row_old and m.items.get("z") == row_x           # freed rows are handed out again
    assert m.recommend(["new"], k=5)[0].items == []  # x and y expired; z seen


def test_memory_stays_bounded_whatever_the_number_of_ids(mcfg):
    cfg = ModelConfig(**{**mcfg.__dict__, "max_users": 50, "max_items": 40, "admit_after": 2})
    m = OnlineMF(cfg)
    rng = np.random.default_rng(0)
    for w in range(60):                          # 60 windows x 40 increments: thousands of distinct ids
        end = (w + 1) * 60_000
        incs = [Increment(f"u{w}-{j}", end, (f"i{rng.integers(10**6)}", "hot"), (1.0, 1.0), (1, 2), 3)
                for j in range(40)]
        lists = m.learn_windows([(end, incs)], 16, 5)
        assert len(lists) == 40
    assert len(m.users) <= 50 and len(m.items) <= 40
    assert m.users.high <= 51 and m.items.high <= 41 and m.capacity()[0] <= 64 and m.capacity()[1] <= 64
    assert len(m.users.pending) <= 50 and len(m.items.pending) <= 40
    assert len(m.seen) <= 100                    # admitted + pending users only
    assert m.items.get("hot") is not None        # the id that keeps coming stays admitted


def test_state_round_trip_with_tables_pending_ids_and_serving_copy(mcfg, tmp_path):
    cfg = ModelConfig(**{**mcfg.__dict__, "admit_after": 2, "expire_after_ms": 5 * 60_000, "sync_every_ms": 180_000})
    m = OnlineMF(cfg)
    m.learn_windows(random_windows(12)[:20], 4, 5)
    r = OnlineMF.restore(m.save(tmp_path / "m"), cfg)
    rest = random_windows(12)[20:]
    assert [w.rec for w in r.learn_windows(rest, 4, 5)] == [w.rec for w in m.learn_windows(rest, 4, 5)]


def test_compiled_and_plain_graph_loops_agree_including_oversize_steps(mcfg):
    """The XLA program (fixed shapes, padded blocks) and the plain graph loop give the reference's lists.
    One step has more pairs than the largest compiled block (it goes through the graph loop mid-call), and
    one window has more lists and seen-item exclusions than fit one compiled part."""
    from freshet.models import online_mf
    big = [inc(f"heavy{j}", [f"i{x}" for x in range(j, j + 700)]) for j in range(4)]    # 2,800 pairs in one step
    many = [inc(f"u{j}", [f"i{j % 50}"], end=120_000) for j in range(online_mf.XLA_LISTS + 30)]
    windows = random_windows(5)[:3] + [(60_000 * 4, big), (60_000 * 5, many)] + random_windows(6)[5:8]
    windows = [(end, incs) for end, incs in sorted(windows, key=lambda w: w[0])]
    cfg = ModelConfig(**{**mcfg.__dict__, "batch_size": 4096, "initial_capacity": 4096})
    ref = Recommender.learn_windows(OnlineMF(cfg), windows, cfg.batch_size, 5)
    plain = OnlineMF(ModelConfig(**{**cfg.__dict__, "xla": False})).learn_windows(windows, cfg.batch_size, 5)
    compiled = OnlineMF(cfg).learn_windows(windows, cfg.batch_size, 5)
    key = lambda lists: [(w.user_id, w.window_end, w.model_version, w.rec.items) for w in lists]  # noqa: E731
    assert key(compiled) == key(plain) == key(ref)
    np.testing.assert_allclose([s for w in compiled for s in w.rec.scores], [s for w in ref for s in w.rec.scores],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("user, items, scores", [
    ('u"1\\', ["i\n\t\x00", "ü\u2028", "plain"], [np.float32(0.1), 1e-20, 3.0]),
    ("u", [], []),
    ("u", ["a", "b"], [float("inf"), float("-inf")]),
])
def test_recommendation_json_is_what_json_dumps_writes(user, items, scores):
    wl = WindowList(user, 60_000, Recommendation(items, scores), 7)
    expected = json.dumps({"user_id": user, "items": items, "scores": [float(s) for s in scores],
                           "window_end": 60_000, "model_version": 7, "emitted_at": 61_000}, ensure_ascii=False)
    assert wl.to_json(61_000) == expected
