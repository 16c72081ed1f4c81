"""The model operator's own rules, with stand-ins for what Flink hands it (state, timers, metrics)."""
from __future__ import annotations

import json

from freshet.udfs.recommend_online import RecommendOnline


class FakeListState:
    def __init__(self):
        self.items = []

    def get(self):
        return list(self.items)

    def add(self, item):
        self.items.append(item)

    def clear(self):
        self.items = []


class FakeCounter:
    def __init__(self):
        self.count = 0

    def inc(self, n=1):
        self.count += n

    def get_count(self):
        return self.count


class FakeMetrics:
    def __init__(self):
        self.counters: dict[str, FakeCounter] = {}
        self.gauges: list[str] = []

    def counter(self, name):
        return self.counters.setdefault(name, FakeCounter())

    def gauge(self, name, fn):
        self.gauges.append(name)


class FakeKeyedListState:
    """A list state per key of ``keys.current``, as Flink's keyed state is per current key."""

    def __init__(self, keys):
        self.keys, self.by_key = keys, {}

    def _state(self):
        return self.by_key.setdefault(self.keys.current, FakeListState())

    def get(self):
        return self._state().get()

    def add(self, item):
        self._state().add(item)

    def clear(self):
        self._state().clear()


class FakeRuntimeContext:
    def __init__(self):
        self.metrics, self.states, self.current = FakeMetrics(), {}, 0

    def get_list_state(self, descriptor):
        return self.states.setdefault(descriptor.name, FakeKeyedListState(self))

    def get_metrics_group(self):
        return self.metrics


class FakeTimers:
    def __init__(self):
        self.timers, self.watermark = [], -1

    def register_event_time_timer(self, t):
        self.timers.append(t)

    def current_watermark(self):
        return self.watermark


class FakeContext:
    def __init__(self, key=0, runtime=None):
        self.timers, self.key, self.runtime = FakeTimers(), key, runtime

    def timer_service(self):
        return self.timers

    def get_current_key(self):
        return self.key

    def enter(self):
        """Make this context's key the current one, as Flink does before each call; returns the context."""
        if self.runtime is not None:
            self.runtime.current = self.key
        return self


def window_row(end, quads, shard=0):
    return ("win", shard, end, end + 5, json.dumps(quads))


def test_levels_are_counters_set_from_the_task_thread_never_python_gauges(cfg):
    """Flink reads gauges from its metrics thread; a Python gauge enters the embedded interpreter from
    that thread while the task thread is in it, and the TaskManager dies (SIGSEGV). So: no gauges."""
    fn = RecommendOnline(cfg.replace(model={"kind": "echo"}))
    rc, ctx = FakeRuntimeContext(), FakeContext()
    fn.open(rc)
    assert rc.metrics.gauges == []

    for end, quads in ((60000, [["u1", "a", 1.0, 1], ["u2", "b", 2.0, 2]]), (120000, [["u1", "c", 1.0, 1]])):
        assert list(fn.process_element(window_row(end, quads), ctx)) == []
    assert ctx.timers.timers == [59999]          # one timer, at the earliest waiting window

    ctx.timers.watermark = 130000
    out = list(fn.on_timer(59999, ctx))
    recs = [json.loads(r[2]) for r in out if r[0] == "rec"]
    assert [(r["user_id"], r["window_end"], r["items"]) for r in recs] == \
           [("u1", 60000, ["a"]), ("u2", 60000, ["b"]), ("u1", 120000, ["c"])]
    assert [r[3] for r in out if r[0] == "rec"] == [60005, 60005, 120005]   # window closed at, per list

    counters = {name: c.get_count() for name, c in rc.metrics.counters.items()}
    assert counters["model_calls"] == 1 and counters["recommendations_emitted"] == 3
    assert counters["live_events"] == fn.shards[0].live.events > 0
    assert counters["last_model_call_ms"] == int(fn.shards[0].last_call_ms)
    assert fn._metrics(fn.shards[0], 130000)["model_call_seconds"] == round(fn.shards[0].last_call_ms / 1000, 2)   # one call so far

    fn.shards[0].last_call_ms = 0.0              # a level goes down as well as up
    fn._publish_levels(fn.shards[0])
    assert rc.metrics.counters["last_model_call_ms"].get_count() == 0


def test_a_restarted_instance_relearns_logged_calls_and_emits_only_what_was_pending(cfg):
    """The replay log round trip: windows logged since the last model snapshot come back after a restart;
    calls made before the checkpoint are learned again silently, the rest are listed once."""
    job_cfg = cfg.replace(model={"kind": "echo"}, flink={"model_snapshot_interval_ms": 3_600_000})
    rc = FakeRuntimeContext()
    first, ctx = RecommendOnline(job_cfg), FakeContext()
    first.open(rc)
    for end, quads in ((60000, [["u 1", "a", 1.0, 1]]), (120000, [["u 1", "b", 2.0, 1], ["v", "c", 1.0, 3]])):
        list(first.process_element(window_row(end, quads), ctx))
    ctx.timers.watermark = 70000
    assert [json.loads(r[2])["window_end"] for r in first.on_timer(59999, ctx) if r[0] == "rec"] == [60000]

    second, ctx2 = RecommendOnline(job_cfg), FakeContext()   # same state, new metrics: as after a restore
    rc.metrics = FakeMetrics()
    second.open(rc)
    ctx2.timers.watermark = 130000
    out = [json.loads(r[2]) for r in second.on_timer(119999, ctx2) if r[0] == "rec"]
    assert [(r["user_id"], r["window_end"], r["items"]) for r in out] == [("u 1", 120000, ["b"]), ("v", 120000, ["c"])]
    assert second.shards[0].restored_windows == 1
    assert rc.metrics.counters["restored_windows"].get_count() == 1


def test_a_restored_instance_reports_the_model_version_it_went_on_from(cfg):
    job_cfg = cfg.replace(model={"kind": "popularity"}, flink={"model_snapshot_interval_ms": 3_600_000})
    rc = FakeRuntimeContext()
    first, ctx = RecommendOnline(job_cfg), FakeContext()
    first.open(rc)
    list(first.process_element(window_row(60000, [["u", "a", 1.0, 1]]), ctx))
    ctx.timers.watermark = 70000
    list(first.on_timer(59999, ctx))
    assert first.shards[0].restored_version == 0 and first.shards[0].model.version > 0          # a fresh start

    second, ctx2 = RecommendOnline(job_cfg), FakeContext()   # same state: as after a restore
    second.open(rc)
    ctx2.timers.watermark = 70000
    list(second.on_timer(59999, ctx2))
    assert second.shards[0].restored_version == first.shards[0].model.version


def test_two_shards_on_one_subtask_stay_two_models_with_their_own_state(cfg):
    """Flink's key groups can put two shard keys on one subtask (parallelism > 1): each key keeps its own
    model, windows, snapshot and metrics, and a restored instance finds each shard's own model again."""
    job_cfg = cfg.replace(model={"kind": "popularity"}, flink={"model_snapshot_interval_ms": 0})
    rc = FakeRuntimeContext()
    fn = RecommendOnline(job_cfg)
    fn.open(rc)
    ctx = {key: FakeContext(key, rc) for key in (0, 1)}
    list(fn.process_element(window_row(60000, [["u", "a", 1.0, 1], ["u2", "a", 1.0, 1]], 0), ctx[0].enter()))
    list(fn.process_element(window_row(60000, [["v", "b", 1.0, 1]], 1), ctx[1].enter()))
    for key in (0, 1):
        ctx[key].timers.watermark = 70000
    out = {key: [json.loads(r[2]) for r in fn.on_timer(59999, ctx[key].enter())] for key in (0, 1)}
    assert sorted(r["user_id"] for r in out[0] if "user_id" in r) == ["u", "u2"]
    assert [r["user_id"] for r in out[1] if "user_id" in r] == ["v"]
    assert fn.shards[0].model is not fn.shards[1].model
    assert (fn.shards[0].model.n_items, fn.shards[1].model.n_items) == (1, 1)      # "a" apart from "b"

    restored = RecommendOnline(job_cfg)            # same state: as after a restore
    restored.open(rc)
    ctx = {key: FakeContext(key, rc) for key in (0, 1)}
    for key, item, user in ((0, "c", "w"), (1, "d", "x")):
        list(restored.process_element(window_row(120000, [[user, item, 1.0, 1]], key), ctx[key].enter()))
        ctx[key].timers.watermark = 130000
        list(restored.on_timer(119999, ctx[key].enter()))
    assert {key: sorted(restored.shards[key].model.recommend(["new"], k=5)[0].items) for key in (0, 1)} == \
        {0: ["a", "c"], 1: ["b", "d"]}
