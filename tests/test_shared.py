"""Replicas of one model (parallelism > 1): the shared variables' deltas by item id (models/shared.py).
Fast: small random data, no JVM."""
import numpy as np
import pytest

from freshet.models.shared import SharedDelta

from tests.test_model import inc, random_windows
from tests.test_models_common import build

KINDS = ["bpr", "sequence"]     # the model kinds with variables (the baselines are counts in Python)


def split(windows, replicas: int):
    """Each replica's part of the windows: the users whose number is its index mod ``replicas``."""
    return [[(end, [i for i in incs if int(i.user_id[1:]) % replicas == r]) for end, incs in windows]
            for r in range(replicas)]


def exchange(models, min_change: float = 0.0):
    """Every replica's changes since its last export, added to every other replica (through bytes)."""
    blobs = [m.export_shared(min_change).to_bytes() for m in models]
    for r, m in enumerate(models):
        for q, blob in enumerate(blobs):
            if q != r:
                m.apply_shared(SharedDelta.from_bytes(blob))


def shared_by_id(model):
    """The shared variables, per item id (rows differ between replicas), and the dense ones."""
    ids = {i: r for r, i in enumerate(model.items.ids) if i is not None}
    out = {}
    for v in model.variables():
        if not v.shared:        # each replica's own (an optimizer's state)
            continue
        values = v.var.numpy()
        if v.kind == "items":
            out[v.name] = {i: values[r] for i, r in ids.items() if r < len(values)}
        elif v.kind == "dense":
            out[v.name] = values
        elif v.kind == "item_pairs":
            m = int(round(len(values) ** 0.5))
            square = values.reshape(m, m)
            out[v.name] = {(a, b): square[ra, rb] for a, ra in ids.items() for b, rb in ids.items()
                           if ra < m and rb < m and square[ra, rb]}
    return out


def assert_same_shared(a, b):
    sa, sb = shared_by_id(a), shared_by_id(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        if isinstance(sa[name], dict):
            assert sa[name].keys() == sb[name].keys(), name
            for key in sa[name]:
                np.testing.assert_allclose(sa[name][key], sb[name][key], rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
        else:
            np.testing.assert_allclose(sa[name], sb[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_replicas_that_exchange_their_changes_hold_one_shared_model(kind):
    """Two replicas learn from disjoint users and exchange after every call: the same item has the same
    shared rows (and counts) in both, though each numbers its rows in its own order; per-user rows stay
    with their replica."""
    windows = random_windows(5, n_windows=24, n_users=20, n_items=40)
    models = [build(kind), build(kind)]
    for m in models:
        m.start_sync()
    parts = split(windows, 2)
    for j in range(0, len(windows), 6):
        for m, part in zip(models, parts):
            m.learn_windows(part[j:j + 6], 4, 5)
        exchange(models)
    a, b = models
    assert a.items.ids != b.items.ids                # rows were numbered apart ...
    assert set(a.items.rows) == set(b.items.rows)    # ... but both know every item
    assert_same_shared(a, b)
    if kind == "bpr":       # user rows are not shared: each replica has only its own users
        assert not set(a.users.rows) & set(b.users.rows)


def max_shared_gap(a, b) -> float:
    """The largest difference of one shared value (item rows and dense) between two replicas (items both know)."""
    sa, sb = shared_by_id(a), shared_by_id(b)
    gaps = [0.0]
    for name, v in sa.items():
        if isinstance(v, dict) and name not in ("transitions",):
            gaps += [float(np.max(np.abs(v[i] - sb[name][i]))) for i in v.keys() & sb[name].keys()]
        elif not isinstance(v, dict):
            gaps.append(float(np.max(np.abs(v - sb[name]))))
    return max(gaps)


@pytest.mark.parametrize("kind", KINDS)
def test_a_min_change_sends_fewer_rows_keeps_the_replicas_close_and_loses_nothing(kind):
    """With ``replica_sync_min_change`` a row goes out only once a value of it moved more than that: the deltas
    hold fewer rows, the replicas differ by at most the threshold per value and replica (what each still holds
    back), and a send of every change (as before every snapshot) makes them one model again."""
    windows = random_windows(5, n_windows=24, n_users=20, n_items=40)
    eps = 2e-3
    runs = {}
    for threshold in (0.0, eps):
        models = [build(kind), build(kind)]
        for m in models:
            m.start_sync()
        parts, rows_sent = split(windows, 2), 0
        for j in range(0, len(windows), 6):
            for m, part in zip(models, parts):
                m.learn_windows(part[j:j + 6], 4, 5)
            deltas = [m.export_shared(threshold) for m in models]
            rows_sent += sum(len(at) for d in deltas for at, _ in d.rows.values())
            for r, m in enumerate(models):
                m.apply_shared(SharedDelta.from_bytes(deltas[1 - r].to_bytes()))
        runs[threshold] = (models, rows_sent)
    (exact, sent_all), (close, sent_some) = runs[0.0], runs[eps]
    assert sent_some < sent_all
    assert_same_shared(*exact)
    gap = max_shared_gap(*close)
    assert 0 < gap <= 2 * eps + 1e-5          # each replica holds back at most eps of each value
    exchange(close)                            # every change goes out
    assert_same_shared(*close)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_items", [1000, 8])
@pytest.mark.parametrize("min_change", [0.0, 2e-3])
def test_an_export_of_the_rows_learning_changed_is_the_export_of_a_whole_compare(kind, min_change, max_items):
    """A model reports the rows its steps change, and an export compares only those (and what it held back):
    each export sends exactly the bytes that comparing every row sends, also while items are evicted."""
    windows = random_windows(7, n_windows=24, n_users=20, n_items=40)
    pairs = []
    for tracked in (True, False):
        models = [build(kind, max_items=max_items), build(kind, max_items=max_items)]
        for m in models:
            m.start_sync()
            assert m._sync.dirty                # the model reports its changed rows
            if not tracked:
                m._sync.dirty.clear()       # untracked: every row is read and compared
        pairs.append(models)
    parts = split(windows, 2)
    for j in range(0, len(windows), 3):
        sent = []
        for models in pairs:
            for m, part in zip(models, parts):
                m.learn_windows(part[j:j + 3], 4, 5)
            blobs = [m.export_shared(min_change).to_bytes() for m in models]
            for r, m in enumerate(models):
                m.apply_shared(SharedDelta.from_bytes(blobs[1 - r]))
            sent.append(blobs)
        assert sent[0] == sent[1], j
    assert any(SharedDelta.from_bytes(b).ids for b in sent[0])


@pytest.mark.parametrize("kind", KINDS)
def test_without_exchange_replicas_drift_apart(kind):
    """The check above can fail: replicas that do not exchange hold different shared rows."""
    windows = random_windows(5, n_windows=24, n_users=20, n_items=40)
    models = [build(kind), build(kind)]
    for m, part in zip(models, split(windows, 2)):
        m.learn_windows(part, 4, 5)
    with pytest.raises(AssertionError):
        assert_same_shared(*models)


@pytest.mark.parametrize("kind", KINDS)
def test_an_item_starts_alike_on_every_replica_whatever_order_ids_arrive_in(kind):
    a, b = build(kind), build(kind)
    for m, order in ((a, ["x", "y", "z"]), (b, ["z", "x", "y"])):
        for item in order:
            m.items.lookup(item, 60_000, 0)
        m._grow()
        m._init_assigned()
    for v in a.variables():
        if v.kind == "items":
            va, vb = v.var.numpy(), next(w for w in b.variables() if w.name == v.name).var.numpy()
            for item in "xyz":
                np.testing.assert_array_equal(va[a.items.get(item)], vb[b.items.get(item)])


@pytest.mark.parametrize("kind", KINDS)
def test_a_replica_does_not_send_back_what_it_received(kind):
    a, b = build(kind), build(kind)
    for m in (a, b):
        m.start_sync()
    a.learn_windows([(60_000, [inc("u1", ["i1", "i2"])]), (120_000, [inc("u1", ["i3"], end=120_000)])], 4, 5)
    delta = a.export_shared()
    assert delta.ids and not delta.empty
    b.apply_shared(SharedDelta.from_bytes(delta.to_bytes()))
    assert set(b.items.rows) == {"i1", "i2", "i3"}
    assert b.export_shared().empty          # only what b learned itself would go out, and it learned nothing
    assert a.export_shared().empty          # and a's changes went out once


@pytest.mark.parametrize("kind", KINDS)
def test_the_state_of_a_replica_round_trips_and_syncing_starts_afresh_after(kind):
    """A restored replica continues from its state; its next export holds only changes made after start_sync."""
    a = build(kind)
    a.learn_windows(random_windows(1, n_windows=6), 4, 5)
    r = type(a).from_bytes(a.to_bytes(), a.cfg)
    r.start_sync()
    assert r.export_shared().empty


@pytest.mark.parametrize("kind", KINDS)
def test_replicas_under_the_memory_bound_keep_exchanging(kind):
    """Items are evicted (and rows reused) while replicas exchange: deltas for items a replica cannot hold are
    left out, its own forgetting is not sent, and every variable stays finite."""
    windows = random_windows(6, n_windows=24, n_users=20, n_items=40)
    models = [build(kind, max_items=8), build(kind, max_items=8)]
    for m in models:
        m.start_sync()
    for j in range(0, len(windows), 4):
        for m, part in zip(models, split(windows, 2)):
            lists = m.learn_windows(part[j:j + 4], 4, 5)
            assert all(len(set(w.rec.items)) == len(w.rec.items) for w in lists)
        exchange(models)
    for m in models:
        assert len(m.items) <= 8 and m.items.evictions > 0
        for v in m.variables():
            assert np.isfinite(v.var.numpy()).all(), v.name
