"""The model operator's own rules, with stand-ins for what Flink hands it (state, timers, metrics)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pyflink.datastream import TimeDomain

from freshet.models.shared import SyncRecord
from freshet.udfs.recommend_online import END_OF_INPUT, RecommendOnline


class FakeListState:
    def __init__(self):
        self.items = []

    def get(self):
        return iter(list(self.items))       # an iterable, as PyFlink's (a generator in thread mode): len() fails

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
    def __init__(self, index=0):
        self.metrics, self.states, self.current, self.attempt, self.index = FakeMetrics(), {}, 0, 0, index

    def get_index_of_this_subtask(self):
        return self.index

    def get_list_state(self, descriptor):
        return self.states.setdefault(descriptor.name, FakeKeyedListState(self))

    def get_metrics_group(self):
        return self.metrics

    def get_attempt_number(self):
        return self.attempt


class FakeTimers:
    def __init__(self):
        self.timers, self.watermark = [], -1
        self.processing, self.now_ms = [], 1_000_000     # processing-time timers, and the wall clock

    def register_event_time_timer(self, t):
        self.timers.append(t)

    def register_processing_time_timer(self, t):
        self.processing.append(t)

    def current_processing_time(self):
        return self.now_ms

    def current_watermark(self):
        return self.watermark


class FakeContext:
    def __init__(self, key=0, runtime=None):
        self.timers, self.key, self.runtime = FakeTimers(), key, runtime
        self.domain = TimeDomain.EVENT_TIME          # of the timer being fired

    def time_domain(self):
        return self.domain

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


def test_a_shard_whose_timers_stop_before_its_metrics_are_due_still_reports_its_last_calls(cfg):
    """Live metrics go out at most every ``flink.metrics_interval_ms``, from the shard's timers. When its event-time
    timers stop before the next report is due (its input caught up, or paused), a processing-time timer reports what
    it did since its last record, once: a p = 2 replica restored after a kill -9 caught up within the interval and
    left no record of its new life (CI failure of the p = 2 kill -9 test)."""
    fn = RecommendOnline(cfg.replace(model={"kind": "echo"}, flink={"metrics_interval_ms": 10000}))
    rc, ctx = FakeRuntimeContext(), FakeContext()
    fn.open(rc)

    def fire(timestamp, domain=TimeDomain.EVENT_TIME):
        ctx.domain = domain
        return [json.loads(r[2]) for r in fn.on_timer(timestamp, ctx) if r[0] == "metrics"]

    list(fn.process_element(window_row(60000, [["u1", "a", 1.0, 1]]), ctx))
    ctx.timers.watermark = 60000
    assert fire(59999) == [], "the shard reports at most every metrics_interval_ms (it started just now)"
    assert len(ctx.timers.processing) == 1 and 1_000_000 < ctx.timers.processing[0] <= 1_010_000

    list(fn.process_element(window_row(120000, [["u2", "b", 1.0, 2]]), ctx))
    ctx.timers.watermark = 120000
    assert fire(119999) == [] and len(ctx.timers.processing) == 1, "one report timer at a time"

    [report] = fire(ctx.timers.processing[0], TimeDomain.PROCESSING_TIME)
    assert report["model_calls"] == 2 and report["recommendations_emitted"] == 2 and report["watermark"] == 120000
    assert fire(ctx.timers.processing[0], TimeDomain.PROCESSING_TIME) == [], "nothing new: no second record"
    ctx.timers.watermark = 130000
    assert fire(129999) == [] and len(ctx.timers.processing) == 1, "nothing new since the report: no timer"


def test_windows_closed_within_the_call_interval_wait_for_one_later_call_and_none_is_lost(cfg):
    """``flink.model_call_interval_ms``: in a replay the watermark closes windows every 200 ms and an operator that
    keeps up paid a call's fixed cost at each. Windows closed within the interval after a call wait for one
    processing-time timer, which calls them together with those closed meanwhile; the end of input never waits;
    a timer restored with the state (its purpose unknown) calls what waits, or arms a timer for it."""
    job_cfg = cfg.replace(model={"kind": "echo"},
                          flink={"model_call_interval_ms": 1000, "model_snapshot_interval_ms": 3_600_000})
    rc, ctx = FakeRuntimeContext(), FakeContext()
    fn = RecommendOnline(job_cfg)
    fn.open(rc)

    def step(end, now_ms, domain=TimeDomain.EVENT_TIME, timestamp=None, watermark=None):
        """A window row (end None: none), then the timer; the windows listed."""
        if end is not None:
            list(fn.process_element(window_row(end, [[f"u{end}", "a", 1.0, 1]]), ctx))
        ctx.timers.now_ms, ctx.timers.watermark, ctx.domain = now_ms, watermark or end, domain
        return sorted({json.loads(r[2])["window_end"] for r in fn.on_timer(timestamp or end - 1, ctx) if r[0] == "rec"})

    assert step(60000, 1_000_000) == [60000], "the first call goes at once"
    assert step(120000, 1_000_200) == [] and step(180000, 1_000_400) == [], "within the interval: they wait"
    assert ctx.timers.processing.count(1_001_000) == 1, "one timer, at the round's end"
    assert step(None, 1_001_000, TimeDomain.PROCESSING_TIME, 1_001_000, 180000) == [120000, 180000]
    assert rc.metrics.counters["model_calls"].get_count() == 2

    assert step(240000, 1_001_100) == [], "a new round began at 1_001_000"
    restored, ctx = RecommendOnline(job_cfg), FakeContext()     # same state: as after a restore (watermark unknown)
    restored.open(rc)
    fn, rc.metrics = restored, FakeMetrics()
    assert step(None, 1_002_000, TimeDomain.PROCESSING_TIME, 1_002_000, -2 ** 63) == []
    assert ctx.timers.timers == [239999], "the restored timer arms one for the waiting window"
    assert step(None, 1_002_010, timestamp=239999, watermark=240000) == [240000]
    assert step(300000, 1_002_020) == [], "within the interval"
    assert END_OF_INPUT - 1 in ctx.timers.timers, "a waiting window's event-time timer has fired: one for the end"
    assert step(None, 1_002_030, timestamp=END_OF_INPUT - 1, watermark=END_OF_INPUT) == [300000], \
        "the end of input (a bounded job ends without processing-time timers) never waits"


def test_a_window_row_behind_the_watermark_is_listed_when_it_arrives(cfg):
    """At parallelism > 1 the watermark can pass a window on one input channel while the channel that brings the
    window's row is idle (the end of input reaching the subtasks one at a time, after the sources went idle).
    A timer for the row would never fire after the end of input: the row is learned and listed at once."""
    fn = RecommendOnline(cfg.replace(model={"kind": "echo"}))
    rc, ctx = FakeRuntimeContext(), FakeContext()
    fn.open(rc)
    list(fn.process_element(window_row(60000, [["u1", "a", 1.0, 1]]), ctx))
    ctx.timers.watermark = END_OF_INPUT
    assert [json.loads(r[2])["window_end"] for r in fn.on_timer(59999, ctx) if r[0] == "rec"] == [60000]
    out = [json.loads(r[2]) for r in fn.process_element(window_row(120000, [["u2", "b", 1.0, 1], ["u1", "c", 1.0, 1]]), ctx)
           if r[0] == "rec"]
    assert [(r["user_id"], r["window_end"], r["items"]) for r in out] == [("u1", 120000, ["c"]), ("u2", 120000, ["b"])]
    assert ctx.timers.timers == [59999], "no timer for a window the watermark has passed"
    assert fn.shards[0].calls == 2 and fn.shards[0].buffer.next_end() is None


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


# ---- replicas of one model (parallelism > 1) ----------------------------------------------------------------
class FakeSyncTopic:
    """The sync topic, one partition: every replica's records in the order they were sent."""

    def __init__(self):
        self.records: list[bytes] = []


class FakeSyncFeed:
    """:class:`freshet.ops.kafka_io.SyncFeed` on a :class:`FakeSyncTopic` (``since`` is its beginning)."""
    topic: FakeSyncTopic = None     # set per test (monkeypatched class attribute)

    def __init__(self, cfg, since_ms):
        self.next = None

    def start(self, positions):
        self.next = positions.get(0, 0)

    def poll(self, timeout=0.0):
        out = [(0, offset, text) for offset, text in enumerate(self.topic.records) if offset >= self.next]
        self.next = len(self.topic.records)
        return out

    def positions(self):
        return {} if self.next is None else {0: self.next}

    def close(self):
        pass


class FakeSyncSender:
    """:class:`freshet.ops.kafka_io.SyncSender`: what a replica sent, for the test to put on the topic."""

    def __init__(self, cfg):
        self.outbox: list[bytes] = []

    def send(self, key, value):
        self.outbox.append(value.encode() if isinstance(value, str) else value)     # as Kafka carries it

    def close(self):
        pass


@pytest.fixture
def sync_topic(monkeypatch):
    """Replicas built in the test read this topic; what they send the test puts there (``sync_records``)."""
    from freshet.ops import kafka_io
    topic = FakeSyncTopic()
    monkeypatch.setattr(kafka_io, "SyncFeed", type("Feed", (FakeSyncFeed,), {"topic": topic}))
    monkeypatch.setattr(kafka_io, "SyncSender", FakeSyncSender)
    return topic


def synced_cfg(cfg, **flink):
    """Two replicas of a small BPR model that send every change (the tests with a threshold set one)."""
    return cfg.replace(model={"kind": "bpr", "dim": 8, "negatives": 4, "batch_size": 4, "initial_capacity": 64},
                       flink={"parallelism": 2, "replica_sync": True, "model_snapshot_interval_ms": 3_600_000,
                              "replica_sync_wait_ms": 0, "replica_sync_min_change": 0.0, **flink})


class Subtask:
    """One subtask of the synced model operator: its function, keyed state and context for key ``key``."""

    def __init__(self, cfg, key, runtime=None, since_ms=1000, senders=(0, 2), seeds=None, subtasks=None):
        from freshet.udfs.recommend_online import RecommendOnlineSynced
        self.key, self.rc = key, runtime or FakeRuntimeContext()
        self.rc.current = key
        self.fn = RecommendOnlineSynced(cfg, since_ms=since_ms, senders=senders, seeds=seeds, subtasks=subtasks)
        self.ctx = FakeContext(key, self.rc)
        self.fn.open(self.rc)
        self.fn.restore_wait_s = 5.0        # a logged delta not found fails the test in seconds, not minutes

    def window(self, end, quads):
        assert list(self.fn.process_element(window_row(end, quads, self.key), self.ctx.enter())) == []

    def fire(self, watermark):
        """The timers up to ``watermark``: what the function emits, then what it sent (as ("sync", record) rows)."""
        self.ctx.timers.watermark = watermark
        out = list(self.fn.on_timer(min(t for t in self.ctx.timers.timers if t <= watermark), self.ctx.enter()))
        sent, self.fn.sender.outbox = self.fn.sender.outbox, []
        return out + [("sync", str(self.key), record, None) for record in sent]

    def shared(self):
        """Item id -> its rows of every shared variable, rounded (float sums of other orders differ in the last bits)."""
        m = self.fn.shards[self.key].model
        values = [v.var.numpy() for v in m.variables() if v.shared]
        return {i: tuple(np.round(x[r], 5).tolist() for x in values) for r, i in enumerate(m.items.ids) if i}


def sync_records(out, markers=True):
    """What a replica sent; ``markers=False``: its deltas only (not the marker a replica sends when it loads)."""
    return [r[2] for r in out if r[0] == "sync" and (markers or not SyncRecord.parse(r[2]).marker)]


def restored(subtask, cfg, attempt=1, since_ms=1000):
    """``subtask`` as its checkpoint (the keyed state as it is now) restores it, in the task's next attempt; with
    another ``since_ms`` and attempt 0, as a job resumed from a savepoint (a new job) restores it."""
    runtime = copy.deepcopy(subtask.rc)
    runtime.attempt = attempt
    return Subtask(cfg, subtask.key, runtime=runtime, since_ms=since_ms)


def test_replicas_exchange_their_changes_through_sync_records_and_apply_each_once(cfg, sync_topic):
    """Two replicas on their own users: each sends its changes after a call, the other reads them from the
    topic and applies them before its next one (a copy is applied once, its own records never): shared rows
    agree."""
    job_cfg = synced_cfg(cfg, model_snapshot_interval_ms=0)
    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    a.window(60000, [["u1", "x", 1.0, 1], ["u1", "y", 2.0, 1]])
    b.window(60000, [["v1", "y", 1.0, 1], ["v1", "z", 1.0, 1]])
    sent_a, sent_b = sync_records(a.fire(70000)), sync_records(b.fire(70000))
    assert [SyncRecord.parse(r).marker for r in sent_a + sent_b] == [True, False, True, False]
    sent_a, sent_b = sent_a[1:], sent_b[1:]
    sync_topic.records += sent_a + sent_b + sent_a       # at least once: a copy
    a.window(120000, [["u1", "z", 1.0, 1]])
    b.window(120000, [["v1", "x", 1.0, 1]])
    more = sync_records(a.fire(130000)) + sync_records(b.fire(130000))
    assert a.fn.shards[0].sync.applied == {2: 1} and b.fn.shards[2].sync.applied == {0: 1}
    sync_topic.records += more
    for s in (a, b):                            # what a replica does before its next call
        s.fn._replica_before_call(s.fn.shards[s.key], [(180000, [])])
    assert a.fn.shards[0].sync.applied == {2: 2} and b.fn.shards[2].sync.applied == {0: 2}
    metrics = a.fn._metrics(a.fn.shards[0], 130000)
    assert metrics["sync_applied"] == 2 and metrics["sync_sent"] == 2 and metrics["sync_bytes_sent"] > 0
    assert metrics["sync_received"] == 2 and metrics["sync_waiting"] == 0
    assert set(a.shared()) == {"x", "y", "z"} and a.shared() == b.shared()     # one model's item side


def test_a_replica_applies_no_delta_holding_events_after_the_window_it_lists(cfg, sync_topic):
    """A replica ahead in event time sends deltas of later windows: one behind keeps them until it lists a window
    at or after their last one, so no list reflects another replica's events after its window_end."""
    job_cfg = synced_cfg(cfg)
    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    b.window(60000, [["v1", "y", 1.0, 1]])
    b.window(120000, [["v1", "z", 1.0, 1]])
    sync_topic.records += sync_records(b.fire(130000))          # one delta: windows up to 120000
    a.window(60000, [["u1", "x", 1.0, 1]])
    a.fire(70000)
    assert a.fn.shards[0].sync.applied == {} and len(a.fn.inboxes[0].waiting) == 1
    assert "z" not in a.fn.shards[0].model.items.ids
    a.window(120000, [["u1", "y", 1.0, 1]])
    a.fire(130000)
    assert a.fn.shards[0].sync.applied == {2: 1} and "z" in a.fn.shards[0].model.items.ids


def test_a_replica_ahead_waits_for_the_others_progress_for_at_most_the_set_time(cfg, sync_topic):
    """Bounded staleness: before a call, a replica waits until every other replica's progress reaches its own at
    its last send (then it applies their deltas of those windows), for at most flink.replica_sync_wait_ms."""
    job_cfg = synced_cfg(cfg, replica_sync_wait_ms=50)
    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    a.window(60000, [["u1", "x", 1.0, 1]])
    sync_topic.records += sync_records(a.fire(70000))      # a's progress: 70001 (its watermark)
    a.window(120000, [["u1", "y", 1.0, 1]])
    a.fire(130000)                                         # b never sent: a waits 50 ms, then goes on
    assert a.fn.shards[0].sync_wait_timeouts == 1 and a.fn.shards[0].sync_wait_s >= 0.05
    b.window(60000, [["v1", "z", 1.0, 1]])
    sync_topic.records += sync_records(b.fire(130000))     # b's progress: 130001, its delta: upto 60000
    a.window(180000, [["u1", "w", 1.0, 1]])
    sync_topic.records += sync_records(a.fire(190000))     # a's progress: 190001
    assert a.fn.shards[0].sync_wait_timeouts == 1 and a.fn.shards[0].sync.applied == {2: 1}
    assert "z" in a.fn.shards[0].model.items.ids
    assert 179999 in b.ctx.timers.timers, "b's heartbeat: the next window end after its watermark"
    beat = sync_records(b.fire(190000))                   # b has no window there: its heartbeat says 190001
    assert len(beat) == 1 and SyncRecord.parse(beat[0]).progress == 190001
    sync_topic.records += beat
    a.window(240000, [["u1", "v", 1.0, 1]])
    a.fire(250000)
    assert a.fn.shards[0].sync_wait_timeouts == 1, "b's heartbeat, not the limit, let a go on"


@pytest.mark.parametrize("snapshot_first_call, sync_events, wait_ms, resumed, min_change", [
    (False, 0, 0, False, 0.0), (True, 0, 0, False, 0.0), (True, 3, 0, False, 0.0), (False, 0, 1, False, 0.0),
    (False, 0, 0, True, 0.0), (True, 0, 0, True, 0.0), (False, 0, 0, False, 0.05), (True, 0, 0, False, 0.05)])
def test_a_restored_replica_redoes_its_logged_applies_and_sends_and_reaches_the_same_model(
        cfg, sync_topic, snapshot_first_call, sync_events, wait_ms, resumed, min_change):
    """Snapshot + log for a replica: the deltas it applied (read again from the topic, from the snapshot's
    positions) and the exports it made between logged calls are re-done in order, so the restored model is
    exactly the one it had, and its next export is the same delta an uninterrupted replica sends. (A replica's
    snapshot waits for its next send.) ``resumed``: restored by a new job (a savepoint), whose own exchange
    differs: the replica keeps the exchange its log belongs to, also before its first snapshot (without that,
    a p = 2 drain through a resumed job waited in vain for the logged deltas). ``min_change``: sends hold back
    small changes; the snapshot's send holds back none, and the redo uses each logged send's threshold."""
    since, attempt = (9000, 0) if resumed else (1000, 1)
    job_cfg = synced_cfg(cfg, replica_sync_events=sync_events, replica_sync_wait_ms=wait_ms,
                         replica_sync_min_change=min_change)
    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    a.window(1, [["warm", "x", 1.0, 1]])        # loads a's shard; its snapshot is due at the next call or never
    a.fn.shards[0].last_snapshot = float("-inf") if snapshot_first_call else float("inf")
    rounds = [(60000, [["u1", "x", 1.0, 1], ["u1", "y", 2.0, 1]], [["v1", "y", 1.0, 1], ["v1", "z", 1.0, 1]]),
              (120000, [["u1", "z", 1.0, 1]], [["v1", "x", 1.0, 1], ["v2", "y", 3.0, 2]]),
              (180000, [["u2", "y", 1.0, 1], ["u2", "w", 1.0, 1]], [["v2", "x", 1.0, 1]])]
    for end, qa, qb in rounds[:2]:
        a.window(end, qa)
        b.window(end, qb)
        sync_topic.records += sync_records(a.fire(end + 10000)) + sync_records(b.fire(end + 10000))
        a.fn.shards[0].last_snapshot = max(a.fn.shards[0].last_snapshot, 0.0) if snapshot_first_call else float("inf")
    snapshots = len(a.rc.states["model"].by_key.get(0, FakeListState()).items)
    assert snapshots == (1 if snapshot_first_call else 0)
    if min_change:      # the sends since the snapshot held changes back, and the log says with what threshold
        model = a.fn.shards[0].model
        assert any(np.any(v.var.numpy()[:len(model._sync.base[v.name])] != model._sync.base[v.name])
                   for v in model.variables() if v.kind == "items" and v.shared)
        assert [e.split()[2:] for e in a.rc.states["sync_log"].by_key[0].items if e.startswith("send")] == [[repr(min_change)]] * (1 if snapshot_first_call else 2)
    if not sync_events:
        assert a.fn.shards[0].sync.applied == {2: 1}    # b's first delta, applied after any snapshot: redone
    again, b_again = (restored(s, job_cfg, attempt, since) for s in (a, b))   # as checkpointed; the topic is Kafka's
    end, qa, qb = rounds[2]
    b_again.window(end, qb)              # b restores too: its marker says its deltas so far were sent before
    sync_topic.records += b_again.fn.sender.outbox
    for s in (a, again):
        s.window(end, qa)
    out_a, out_r = a.fire(end + 10000), again.fire(end + 10000)
    assert again.fn.shards[0].restored_windows == (1 if snapshot_first_call else 3)
    assert again.shared() == a.shared()
    assert [json.loads(r[2])["items"] for r in out_r if r[0] == "rec"] == \
        [json.loads(r[2])["items"] for r in out_a if r[0] == "rec"]

    def fields(records):                        # all but sent_at, life and base
        return [(p.run, p.sender, p.seq, p.upto, p.progress, p.payload()) for p in map(SyncRecord.parse, records)]
    sent = fields(sync_records(out_a, markers=False))
    assert len(sent) == 1 and fields(sync_records(out_r, markers=False)) == sent
    marker = SyncRecord.parse(sync_records(out_r)[0])
    assert marker.marker and marker.life == (since, attempt) and marker.base == a.fn.shards[0].sync.sent - 1


def test_a_restore_whose_logged_delta_is_gone_from_the_topic_fails_with_a_clear_error(cfg, sync_topic):
    job_cfg = synced_cfg(cfg)
    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    a.window(60000, [["u1", "x", 1.0, 1]])
    b.window(60000, [["v1", "y", 1.0, 1]])
    sync_topic.records += sync_records(b.fire(70000))
    a.fire(70000)
    a.window(120000, [["u1", "y", 1.0, 1]])
    a.fire(130000)                               # applied b's delta 1, logged
    assert a.fn.shards[0].sync.applied == {2: 1}
    sync_topic.records.clear()                   # expired
    again = restored(a, job_cfg)
    again.fn.restore_wait_s = 0.0
    with pytest.raises(RuntimeError, match="delta 1 of replica 2 is logged as applied but was not found"):
        again.window(180000, [["u1", "z", 1.0, 1]])


def test_after_a_failover_a_replica_applies_a_senders_new_deltas_not_those_of_its_failed_life(cfg, sync_topic):
    """The junction after a failure: both replicas restore from one checkpoint in the task's next attempt, and
    what a sender sent after the checkpoint is void (it makes those calls again, here on other input, and sends
    the same numbers again). A receiver holds the sender's deltas of the failed life until the sender's marker
    says where its new life began, then applies those sent before the checkpoint and the new ones, so both
    come to the model of replicas that never failed."""
    job_cfg = synced_cfg(cfg)
    a1, a2, a3 = [["u1", "x", 1.0, 1], ["u1", "y", 2.0, 1]], [["u1", "z", 1.0, 1]], [["u2", "w", 1.0, 1]]
    b1, b3 = [["v1", "y", 1.0, 1], ["v1", "z", 1.0, 1]], [["v2", "x", 1.0, 1]]
    b2_failed, b2 = [["v1", "w", 3.0, 2], ["v3", "q", 1.0, 1]], [["v1", "x", 1.0, 1]]

    # Replicas that never fail, the deltas of each round arriving as they do below.
    c, d = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    c.window(60000, a1)
    d.window(60000, b1)
    first = sync_records(c.fire(70000)) + sync_records(d.fire(70000))
    c.window(120000, a2)
    d.window(120000, b2)
    sync_topic.records += [r for r in first if SyncRecord.parse(r).sender == 0]
    sync_topic.records += sync_records(c.fire(130000))
    sync_topic.records += [r for r in first if SyncRecord.parse(r).sender == 2] + sync_records(d.fire(130000))
    c.window(180000, a3)
    d.window(180000, b3)
    sync_topic.records += sync_records(d.fire(190000))
    c.fire(190000)
    reference = c.shared()
    sync_topic.records.clear()

    a, b = Subtask(job_cfg, 0), Subtask(job_cfg, 2)
    a.window(60000, a1)
    b.window(60000, b1)
    sync_topic.records += sync_records(a.fire(70000)) + sync_records(b.fire(70000))
    cut_a, cut_b = copy.deepcopy(a.rc), copy.deepcopy(b.rc)        # the checkpoint
    a.window(120000, a2)
    b.window(120000, b2_failed)
    sync_topic.records += sync_records(a.fire(130000)) + sync_records(b.fire(130000))   # the failed life's
    assert a.fn.shards[0].sync.applied == {2: 1}

    cut_a.attempt = cut_b.attempt = 1
    a, b = Subtask(job_cfg, 0, runtime=cut_a), Subtask(job_cfg, 2, runtime=cut_b)
    a.window(120000, a2)
    sync_topic.records += sync_records(a.fire(130000))      # b has not loaded yet: no marker of its new life
    assert a.fn.shards[0].sync.applied == {} and {(2, 1), (2, 2)} <= set(a.fn.inboxes[0].waiting), \
        "deltas of b's failed life wait for its marker"
    b.window(120000, b2)
    sync_topic.records += sync_records(b.fire(130000))      # its marker (base 1), then its new delta 2
    a.window(180000, a3)
    b.window(180000, b3)
    sync_topic.records += sync_records(b.fire(190000))
    a.fire(190000)
    assert a.fn.shards[0].sync.applied == {2: 3} and a.fn.inboxes[0].waiting == {}
    assert a.shared() == reference, "b's delta 2 of the failed life must be void, its new one applied"
    assert b.fn.shards[2].sync.applied == {0: 2}


@pytest.mark.parametrize("kind", ["bpr", "sequence"])
def test_a_shard_new_at_a_larger_parallelism_starts_from_a_copy_of_its_old_shard(cfg, sync_topic, kind):
    """1 -> 2 (savepoints.rescaled_shards): the p = 1 job's shard (no sync state) is restored as a replica, sends a
    delta and its whole model (the seed); the new shard waits for it, starts from it in the old one's exchange, its
    moved users keep their rows and seen items (their lists are the old shard's), and writes it to its state at
    once. Then the two exchange deltas like any replicas; a restore of the new one does not wait for a seed."""
    cfg = cfg.replace(model={"kind": kind})
    one_cfg = synced_cfg(cfg, parallelism=1, model_snapshot_interval_ms=0).replace(model={"kind": kind})
    single, ctx, single_rc = RecommendOnline(one_cfg), FakeContext(0), FakeRuntimeContext()
    single.open(single_rc)
    for end, quads in ((60000, [["u1", "x", 1.0, 1], ["u2", "y", 2.0, 1]]), (120000, [["u2", "z", 1.0, 1], ["u1", "y", 1.0, 1]])):
        assert list(single.process_element(window_row(end, quads), ctx)) == []
        ctx.timers.watermark = end + 10000
        list(single.on_timer(end - 1, ctx))
    model = single.shards[0].model
    reference = type(model).from_bytes(model.to_bytes(), one_cfg.model)

    job_cfg = synced_cfg(cfg).replace(model={"kind": kind})
    layout = dict(senders=(0, 1), seeds={1: 0}, subtasks={0: 0, 1: 1}, since_ms=9000)
    old_rc = copy.deepcopy(single_rc)                      # the savepoint: key 0's state
    a = Subtask(job_cfg, 0, runtime=old_rc, **layout)
    b = Subtask(job_cfg, 1, runtime=FakeRuntimeContext(index=1), **layout)
    b.fn.restore_wait_s = 0.0
    with pytest.raises(RuntimeError, match="new at this parallelism and starts from a copy of shard 0"):
        b.window(180000, [["u1", "w", 1.0, 1]])            # the old shard has not loaded yet: no seed on the topic
    b = Subtask(job_cfg, 1, runtime=FakeRuntimeContext(index=1), **layout)
    a.window(180000, [["u2", "w", 1.0, 1]])                # loads the old shard: marker, a delta, the seed
    sent = a.fn.sender.outbox
    assert SyncRecord.parse(sent[0]).marker and sent[-1].startswith(b"seed ") and len(sent) <= 3   # (an empty delta
    # goes out only where others wait for progress)
    sync_topic.records += sent
    a.fn.sender.outbox = []
    b.window(180000, [["u1", "w", 1.0, 1]])                # u1 moved to the new shard
    new, old = b.fn.shards[1], a.fn.shards[0]
    seeded_at = old.sync.sent
    assert new.sync.run == old.sync.run and new.sync.applied == {0: seeded_at}
    assert all(np.array_equal(x.var.numpy(), y.var.numpy())
               for x, y in zip(new.model.variables(), old.model.variables()) if x.shared)
    assert new.model.users.ids == reference.users.ids
    assert new.model.recommend(["u1"], 5) == reference.recommend(["u1"], 5), "u1 keeps its row and seen items"
    assert len(b.rc.states["model"].by_key[1].items) == 1 and b.rc.states["sync"].by_key[1].items, \
        "the copy is in the new shard's state at once"
    sync_topic.records += sync_records(a.fire(190000)) + sync_records(b.fire(190000))
    a.window(240000, [["u2", "x", 1.0, 1]])
    b.window(240000, [["u1", "z", 1.0, 1]])
    a.fire(250000)
    b.fire(250000)
    assert a.fn.shards[0].sync.applied == {1: 1} and b.fn.shards[1].sync.applied == {0: seeded_at + 1}
    again = restored(b, job_cfg, attempt=1, since_ms=9000)
    again.fn.seeds, again.fn.seeds_here = {1: 0}, {1: 0}   # no seed of its new life is on the topic: it must not wait
    again.window(300000, [["u1", "q", 1.0, 1]])
    assert again.fn.shards[1].model.users.ids == b.fn.shards[1].model.users.ids
    assert again.fn.seeds_here == {}, "loaded from its own state: no seed of its source is kept for it"
