"""RecommendOnline: increments -> micro-batch training steps -> top-K lists when their window closes.

The model lives in Flink keyed state, so a checkpoint holds the model *as of that checkpoint*:

* ``model``: a snapshot of the model's full state (parameters, id tables, seen sets, counters, random
  streams) as bytes, rewritten every ``flink.model_snapshot_interval_ms`` of processing time;
* ``log``: every window batch received since that snapshot (one append per window and shard);
* ``flushes``: the last ``window_end`` of each model call since the snapshot.

On restore the function loads the snapshot and re-runs the logged calls that had completed before
the checkpoint (their lists were emitted and committed with it, so nothing is emitted again); the
remaining logged increments go back into the window buffer. The model then continues from exactly
the parameters it had at the checkpoint, not from scratch and not from a later point. Writing the
whole model on every call would cost far more than appending increments; replaying at most one
snapshot interval of calls costs seconds, once, on restore.

The input is keyed by model shard (computed in SQL from the user id): one model per key, its state under
that key; were two shards to meet on one subtask, they would stay two models (:class:`Shard`). Each input
row is a whole window of a shard (``kind = 'win'``: every user's items as one JSON text), so the JVM ->
Python boundary is crossed once per window, not once per event; dead letters found in the JVM
(``kind = 'dlq'``) pass straight through.
"""
from __future__ import annotations

import base64
import json
import time

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction, TimeDomain
from pyflink.datastream.state import ListStateDescriptor

from freshet.conf.settings import Config
from freshet.models.evaluation import LiveHitRate
from freshet.models.increments import Increment, WindowBuffer
from freshet.models.shared import (SYNCED_KINDS, ReplicaState, SeedParts, SharedDelta, SyncInbox, is_seed,
                                   seed_records)
from freshet.ops.processes import own_thread_group_cpu

# What enters it: (kind, model shard, window_end, window closed at, body). kind "win": a window of the shard,
# body its (user, item, weight, events) quads as JSON; "dlq": a dead letter found in the JVM, body its JSON.
INPUT_TYPE = Types.ROW([Types.STRING(), Types.INT(), Types.LONG(), Types.LONG(), Types.STRING()])
# What leaves this function: (kind, Kafka key, Kafka value, window closed at). kind "rec": a recommendation
# (CONTRACTS §2) keyed by user; "metrics": a live-metrics record; "dlq": a dead letter passed through.
# The job routes them to their topics in SQL. (At parallelism > 1 a replica sends its sync records itself.)
OUTPUT_TYPE = Types.ROW_NAMED(["kind", "user_id", "payload", "closed_at"],
                              [Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG()])
END_OF_INPUT = 2 ** 63 - 1
# The operator's Flink metrics that are levels, not counts (in the order _publish_levels gives them).
LEVELS = ("last_model_call_ms", "live_hit_rate_ppm", "live_events", "model_version", "restored_windows")


def replica_sync_on(cfg: Config, shards: int) -> bool:
    """Whether the job's model replicas exchange their changes (see :class:`RecommendOnlineSynced`): when it has
    more than one model shard (one per subtask, unless a savepoint resumed at a lower parallelism keeps more)."""
    return shards > 1 and cfg.flink.replica_sync and cfg.model.kind in SYNCED_KINDS


def model_class(cfg: Config):
    if cfg.model.kind in ("popularity", "recent-popularity"):
        from freshet.models.popularity import Popularity
        return Popularity
    if cfg.model.kind == "sequence":
        from freshet.models.sequence import SequenceModel
        return SequenceModel
    if cfg.model.kind == "transition":
        from freshet.models.transition import Transition
        return Transition
    if cfg.model.kind == "echo":
        from freshet.models.echo import Echo
        return Echo
    from freshet.models.online_mf import OnlineMF
    return OnlineMF


def build_model(cfg: Config):
    """The model behind the job (built in the worker, so TensorFlow never loads in the client)."""
    return model_class(cfg)(cfg.model)


def log_entry(window_end: int, closed_at: int, quads: str) -> str:
    """One window row of the replay log as text.

    >>> log_entry_fields(log_entry(60000, 60012, '[["u 1", "a", 1.0, 1]]'))
    (60000, 60012, '[["u 1", "a", 1.0, 1]]')
    """
    return f"{int(window_end)} {int(closed_at)} {quads}"


def log_entry_fields(entry: str) -> tuple[int, int, str]:
    window_end, closed_at, quads = entry.split(" ", 2)
    return int(window_end), int(closed_at), quads


class Level:
    """A value (a gauge's meaning) published through a Flink counter: ``set`` moves the count to it."""

    def __init__(self, counter):
        self.counter, self.value = counter, 0

    def set(self, value) -> None:
        value = int(value)
        if value != self.value:
            self.counter.inc(value - self.value)
            self.value = value


class Shard:
    """What the operator keeps for one model shard (one key): its model, the windows waiting for the
    watermark, and its live quality. Its Flink state is the operator's keyed state under the shard's key."""

    def __init__(self, key: int, model, k: int):
        self.key, self.model = key, model
        self.buffer = WindowBuffer()
        self.window_rows: dict[int, tuple[int, str]] = {}   # pending window_end -> (closed_at, quads), for the log
        self.closed_at: dict[int, int] = {}                 # window_end -> when the JVM closed it (last call)
        self.armed: int | None = None   # the earliest event-time timer registered for it that has not fired
        self.last_call_ms = 0.0
        self.model_call_seconds = 0.0     # inside model calls since (re)start: what the model costs the job
        self.calls = self.emitted = 0
        self.restored_windows = 0
        self.restored_version = 0
        self.restored_upto = 0            # the last window_end of the calls re-learned on restore
        self.last_snapshot = self.last_metrics = time.monotonic()
        self.end_reported = False
        self.reported: tuple = ()         # report_state() at its last live-metrics record
        self.metrics_timer: int | None = None   # the processing time at which a timer will report it (_report_later)
        self.call_timer: int | None = None      # ... at which a timer will make its deferred call (_defer)
        self.called_at = 0                      # the processing time of its last call (_defer)
        self.live = LiveHitRate(k)
        self.logged_calls = 0             # calls in the flush log (since the last snapshot)
        self.sync: ReplicaState | None = None       # parallelism > 1: this replica's place in the exchange
        self.sync_bytes = self.sync_applied = 0     # since (re)start: sent, and deltas applied
        self.sync_lag_ms: list[float] = []          # sent -> applied, of the deltas applied since the last metrics
        self.watermark = -1                         # of the timer being handled
        self.sync_target: int | None = None         # its progress at its last send: the others' to wait for
        self.sync_flushed = True                    # its last send sent every change (replica_sync_min_change)
        self.heartbeat: int | None = None           # its timer at the next window end after the watermark
        self.sync_wait_s = 0.0                      # waited for it since (re)start
        self.sync_cpu_s = {"apply": 0.0, "send": 0.0}   # the task thread's CPU in applying others' deltas (parsing
                                                    # them included, waiting not) and in exporting and sending its own
        self.sync_wait_timeouts = 0

    def report_state(self) -> tuple:
        """What changes when the shard has something new to report in its live metrics."""
        return self.calls, self.emitted, self.sync_applied, self.sync_bytes


class RecommendOnline(KeyedProcessFunction):
    """Keyed by model shard: one model per key, so shards that Flink's key groups put on one subtask still
    learn apart (``shard``: the key's :class:`Shard`). Increments of many users share each micro-batch.

    Increments wait in a buffer until the watermark passes their window's end (one event-time timer, at
    the earliest waiting window's ``window_end - 1``). Then all windows closed so far are handed to the
    model in one call, which, per window in order, takes one optimizer step per micro-batch of
    ``model.batch_size`` increments and lists the window's users, so each list reflects exactly the
    events before its ``window_end``.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def open(self, runtime_context):
        self.shards: dict[int, Shard] = {}   # loaded lazily: keyed state can only be read with a current key
        self.round_at = 0                    # the processing time at which this subtask's last round of calls began
        # A fresh model, compiled for its first call now, while the JVM starts reading: used by the first shard
        # unless a checkpoint holds one (TensorFlow's import and the XLA compile took ~10 s after the first window).
        self.fresh = build_model(self.cfg)
        self.fresh.warm_up(self.cfg.model.k)
        # What being ready cost the operator's threads (Flink's set-up, TensorFlow's import, the build and compile):
        # a fixed cost per subtask, reported so that a benchmark can tell it from the per-event cost.
        self.startup_cpu_s = own_thread_group_cpu()
        # A list of at most one snapshot, base64 text: PyFlink's embedded (thread) mode can neither read an
        # unset ValueState nor hand Python bytes to a byte[] state.
        self.model_state = runtime_context.get_list_state(ListStateDescriptor("model", Types.STRING()))
        # Window rows as text, "<window_end> <closed_at> <quads JSON>": in thread mode a ROW-typed state
        # value is pickled on every append (the Row class's pure-Python __reduce__), a string is not.
        self.log = runtime_context.get_list_state(ListStateDescriptor("log", Types.STRING()))
        self.flush_log = runtime_context.get_list_state(ListStateDescriptor("flushes", Types.LONG()))
        metrics = runtime_context.get_metrics_group()
        self.flushes = metrics.counter("model_calls")
        self.emitted = metrics.counter("recommendations_emitted")
        # Levels are published as counters set from this (the task) thread, never as Python gauges: Flink
        # reads a gauge from its metrics thread whenever the REST API or a reporter asks, and in thread
        # mode that enters this operator's Python interpreter from a foreign thread while the task thread
        # is in it, which crashes the TaskManager (SIGSEGV in libpython's frame stack).
        self.levels = {name: Level(metrics.counter(name)) for name in LEVELS}

    # ---- state -----------------------------------------------------------------------------------
    def _shard(self, key: int) -> Shard:
        """The current key's shard; on its first call after (re)start, the checkpointed model plus the calls
        logged after its snapshot (and, for a replica, the deltas it applied and sent between them, in the
        same order)."""
        shard = self.shards.get(key)
        if shard is not None:
            return shard
        blob = next(iter(self.model_state.get() or []), None)
        model = (model_class(self.cfg).from_bytes(base64.b64decode(blob), self.cfg.model) if blob
                 else self.fresh or build_model(self.cfg))
        self.fresh = None
        shard = self.shards[key] = Shard(key, model, self.cfg.model.k)
        sync_steps = self._replica_restored(shard)
        model = shard.model          # a replica new at a larger parallelism starts from a copy (RecommendOnlineSynced)
        for entry in (self.log.get() or []):
            self._add_window(shard, *log_entry_fields(entry))
        boundaries = sorted(int(b) for b in (self.flush_log.get() or []))
        for call, upto in enumerate(boundaries):  # re-learn exactly the calls made before the checkpoint, emit nothing
            self._replica_redo(shard, sync_steps.get(call, ()))
            closed = self._close(shard, upto - 1)
            model.learn_windows(closed, self.cfg.model.batch_size, self.cfg.model.k, self.cfg.model.exclude_seen)
            shard.restored_windows += len(closed)
            self._replica_learned(shard, closed)
        self._replica_redo(shard, sync_steps.get(len(boundaries), ()))
        shard.logged_calls = len(boundaries)
        shard.restored_upto = boundaries[-1] if boundaries else 0
        shard.restored_version = model.version   # 0 unless a checkpoint held a model or logged calls
        return shard

    def _add_window(self, shard: Shard, window_end: int, closed_at: int, quads: str) -> None:
        for inc in Increment.window_from_quads(window_end, quads, self.cfg.window.max_items_per_increment,
                                               self.cfg.window.max_events_per_user_window):
            shard.buffer.add(inc)
        shard.window_rows[window_end] = (closed_at, quads)

    @staticmethod
    def _close(shard: Shard, watermark: int) -> list:
        closed = shard.buffer.close(watermark)
        shard.closed_at = {end: shard.window_rows.pop(end, (0, ""))[0] for end, _ in closed}
        return closed

    def _snapshot_due(self, shard: Shard) -> bool:
        return time.monotonic() - shard.last_snapshot >= self.cfg.flink.model_snapshot_interval_ms / 1000

    def _snapshot_if_due(self, shard: Shard) -> None:
        if not self._snapshot_due(shard):
            return
        if not self._replica_snapshot(shard):
            return
        shard.logged_calls = 0
        self.model_state.clear()
        self.model_state.add(base64.b64encode(shard.model.to_bytes()).decode("ascii"))
        self.flush_log.clear()
        self.log.clear()
        for window_end, (closed_at, quads) in sorted(shard.window_rows.items()):
            self.log.add(log_entry(window_end, closed_at, quads))
        shard.last_snapshot = time.monotonic()

    # ---- processing ------------------------------------------------------------------------------
    def process_element(self, row, ctx):
        kind, key, window_end, closed_at, body = row[0], row[1], row[2], row[3], row[4]
        if kind == "dlq":
            yield Row("dlq", None, body, None)
            return
        shard = self._shard(key)     # the row's shard is its key: no call into the JVM per row for it
        self._add_window(shard, window_end, closed_at, body)
        self.log.add(log_entry(window_end, closed_at, body))
        if window_end - 1 <= ctx.timer_service().current_watermark():
            # Behind the watermark: it passed on another input channel while this row's channel was idle
            # (window.idleness_ms). A timer for it would fire only at the next advance, and after the end of
            # input there is none: the window is learned and listed now rather than never.
            yield from self._fire(shard, ctx, window_end - 1)
        else:
            self._arm(shard, ctx, window_end)

    @staticmethod
    def _arm(shard: Shard, ctx, window_end: int | None = None) -> None:
        """Keep one timer at the earliest waiting window's last millisecond (a timer per window costs a
        state write each; when it fires, every window the watermark has passed is closed anyway).

        ``window_end``: the window just added; with a timer armed, only it can be earlier than the timer.
        """
        end = window_end if window_end is not None and shard.armed is not None else shard.buffer.next_end()
        if end is not None and (shard.armed is None or end - 1 < shard.armed):
            ctx.timer_service().register_event_time_timer(end - 1)
            shard.armed = end - 1

    def on_timer(self, timestamp, ctx):
        shard = self._shard(ctx.get_current_key())
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            yield from self._on_processing_timer(shard, ctx, timestamp)
            return
        if shard.armed is not None and shard.armed <= timestamp:
            shard.armed = None   # fired (timers fire in timestamp order)
        yield from self._fire(shard, ctx, timestamp)

    def _on_processing_timer(self, shard: Shard, ctx, timestamp: int):
        """A deferred call's turn (:meth:`_defer`), a report's (:meth:`_report_later`), or both (Flink keeps one timer
        per time). A timer restored with a checkpoint's state is either: its shard's windows that the watermark has
        passed are called (or a timer armed for them), then it reports if it has news."""
        if shard.metrics_timer is not None and timestamp >= shard.metrics_timer:
            shard.metrics_timer = None
        if shard.call_timer is None or timestamp >= shard.call_timer:
            shard.call_timer = None
            watermark = ctx.timer_service().current_watermark()
            if self._closable(shard, watermark):
                yield from self._fire(shard, ctx, watermark)   # reports, or has a report timer set
                return
            if shard.armed is None:
                RecommendOnline._arm(shard, ctx)     # its windows' timer only (no replica heartbeat from here)
        if shard.metrics_timer is None and shard.report_state() != shard.reported:
            yield self._metrics_row(shard, ctx.timer_service().current_watermark())

    @staticmethod
    def _closable(shard: Shard, watermark: int) -> bool:
        end = shard.buffer.next_end()
        return end is not None and end - 1 <= watermark

    def _defer(self, shard: Shard, ctx, watermark: int) -> bool:
        """Whether windows that the watermark has closed wait: ``flink.model_call_interval_ms`` after this subtask's
        last round of calls began, a processing-time timer calls them together with those closed meanwhile.

        In a replay the watermark moves every ``flink.watermark_interval_ms``, and an operator that keeps up makes a
        call at each move; a call has a fixed cost (~10 ms: the XLA program's dispatch, padded blocks, Python), so a
        replica with 1/p of the users made 3x the calls of the lone model and cost as much. With live traffic a
        window closes once a minute and no call waits. Rounds are per subtask, not per shard, so that shards that
        meet on one subtask (a resume at a lower parallelism) call together and do not wait for each other's
        progress (``flink.replica_sync_wait_ms``) in turn. The end of input (or a drain) never waits: waiting
        windows are called by a timer at its watermark."""
        interval = self.cfg.flink.model_call_interval_ms
        if not interval or watermark >= END_OF_INPUT:
            return False
        now = ctx.timer_service().current_processing_time()
        if now >= self.round_at + interval:
            self.round_at = now             # a new round of calls
        if shard.called_at < self.round_at:
            shard.called_at = now           # its call in this round
            return False
        if shard.call_timer is None:
            shard.call_timer = self.round_at + interval
            ctx.timer_service().register_processing_time_timer(shard.call_timer)
            # And one that only the end of input (or a drain) fires: a bounded job ends without firing processing-time
            # timers, and the waiting windows have no event-time timer left (theirs fired). (One per time: Flink
            # keeps a single timer per key and timestamp.)
            ctx.timer_service().register_event_time_timer(END_OF_INPUT - 1)
        return True

    def _fire(self, shard: Shard, ctx, timestamp: int):
        """Learn and list every window that ``timestamp`` or the watermark has passed (unless they wait for the
        subtask's next round of calls), then arm the next timer."""
        watermark = ctx.timer_service().current_watermark()
        upto = max(timestamp, watermark)
        if self._closable(shard, upto) and self._defer(shard, ctx, watermark):
            return
        closed = self._close(shard, upto)
        shard.watermark = watermark
        for part in self._calls(shard, closed):   # none when another timer for the same windows already flushed them
            yield from self._call(shard, part)
        if not closed:
            self._replica_idle(shard)
        self._arm(shard, ctx)
        if self._metrics_due(shard, watermark):
            yield self._metrics_row(shard, watermark)
        else:
            self._report_later(shard, ctx)

    def _calls(self, shard: Shard, closed) -> list:
        """The model calls that learn and list ``closed``: one (a replica may make more, to sync between them)."""
        return [closed] if closed else []

    def _call(self, shard: Shard, closed):
        """One model call: learn the windows in order and list each one's users; logged for a restore."""
        started = time.perf_counter()
        self._replica_before_call(shard, closed)
        lists = shard.model.learn_windows(closed, self.cfg.model.batch_size, self.cfg.model.k,
                                          self.cfg.model.exclude_seen)
        self.flush_log.add(closed[-1][0])
        shard.logged_calls += 1
        self._replica_after_call(shard, closed)
        shard.last_call_ms = (time.perf_counter() - started) * 1000
        shard.model_call_seconds += shard.last_call_ms / 1000
        self.flushes.inc()
        shard.calls += 1
        shard.emitted += len(lists)
        emitted_at = int(time.time() * 1000)
        for wl in lists:
            yield Row("rec", wl.user_id, wl.to_json(emitted_at), shard.closed_at.get(wl.window_end))
        self.emitted.inc(len(lists))
        self._score_live(shard, closed, lists)
        self._snapshot_if_due(shard)
        self._publish_levels(shard)

    # ---- hooks where a replica of one model does more (RecommendOnlineSynced); a lone model does nothing --
    def _replica_restored(self, shard: Shard) -> dict:
        """A shard was loaded: its logged sync steps by call (none)."""
        return {}

    def _replica_redo(self, shard: Shard, steps) -> None:
        """Re-do logged sync steps on restore (none)."""

    def _replica_learned(self, shard: Shard, closed) -> None:
        """A call learned ``closed`` (also when re-learned on restore)."""

    def _replica_before_call(self, shard: Shard, closed) -> None:
        """Before a model call that learns and lists ``closed``."""

    def _replica_after_call(self, shard: Shard, closed) -> None:
        """After a model call."""

    def _replica_snapshot(self, shard: Shard) -> bool:
        """Whether a due snapshot may be taken now (always), after writing what the replica keeps with it."""
        return True

    def _replica_idle(self, shard: Shard) -> None:
        """A timer that closed no window."""

    def _publish_levels(self, shard: Shard) -> None:
        """The operator's levels, from the shard that made the last call."""
        values = (shard.last_call_ms, shard.live.hit_rate * 1_000_000, shard.live.events, shard.model.version,
                  shard.restored_windows)
        for name, value in zip(LEVELS, values):
            self.levels[name].set(value)

    # ---- live quality ----------------------------------------------------------------------------
    @staticmethod
    def _score_live(shard: Shard, closed, lists):
        """Prequential, window by window: score a window's events, then remember its lists."""
        by_window: dict[int, list] = {}
        for wl in lists:
            by_window.setdefault(wl.window_end, []).append((wl.user_id, wl.rec.items))
        for window_end, increments in closed:
            shard.live.score(increments)
            shard.live.remember(by_window.get(window_end, []))

    def _metrics_due(self, shard: Shard, watermark: int) -> bool:
        """Whether the shard reports now (``_metrics_row`` notes when it did)."""
        if watermark >= END_OF_INPUT:      # end of a bounded input: every pending timer fires; report once
            done, shard.end_reported = shard.end_reported, True
            return not done
        return time.monotonic() - shard.last_metrics >= self.cfg.flink.metrics_interval_ms / 1000

    def _report_later(self, shard: Shard, ctx) -> None:
        """A shard with news that is not due for a report yet gets a processing-time timer at its next report's
        time. Without it a shard whose event-time timers stop (its input caught up, or ended without a drain)
        never reported its last calls: a restored replica that caught up within ``flink.metrics_interval_ms``
        of its restart left no record of its new life at all (a CI failure of the p = 2 kill -9 test)."""
        if shard.metrics_timer is not None or shard.end_reported or shard.report_state() == shard.reported:
            return
        wait_s = self.cfg.flink.metrics_interval_ms / 1000 - (time.monotonic() - shard.last_metrics)
        shard.metrics_timer = ctx.timer_service().current_processing_time() + max(int(wait_s * 1000), 1)
        ctx.timer_service().register_processing_time_timer(shard.metrics_timer)

    def _metrics_row(self, shard: Shard, watermark: int) -> Row:
        """The shard's live-metrics record, as the operator emits it."""
        shard.last_metrics, shard.reported = time.monotonic(), shard.report_state()
        return Row("metrics", f"shard-{shard.key}", json.dumps({"shard": shard.key, **self._metrics(shard, watermark)}),
                   None)

    def _metrics(self, shard: Shard, watermark: int) -> dict:
        """One live-metrics record (the metrics topic): the shard's quality since (re)start, model size and speed."""
        live, model = shard.live, shard.model
        return {"emitted_at": int(time.time() * 1000),
                "watermark": None if watermark >= END_OF_INPUT else watermark, "k": live.k,
                "live_hit_rate": round(live.hit_rate, 6), "live_events": live.events,
                "live_hits": live.hits, "recommendations_emitted": shard.emitted,
                "model_calls": shard.calls, "last_model_call_ms": round(shard.last_call_ms, 1),
                "model_call_seconds": round(shard.model_call_seconds, 2),
                "model_version": model.version, "users": model.n_users, "items": model.n_items,
                "restored_windows": shard.restored_windows, "restored_model_version": shard.restored_version,
                "shards_on_subtask": len(self.shards),     # > 1: Flink put several shards on this subtask
                **_cpu_fields(self.startup_cpu_s, own_thread_group_cpu())}


def _cpu_fields(startup_s: float | None, now_s: float | None) -> dict:
    """The operator's CPU (its threads') when it was ready and now, for a metrics record (None off Linux).

    >>> _cpu_fields(8.123, 20.0)
    {'startup_cpu_s': 8.12, 'cpu_s': 20.0}
    """
    return {"startup_cpu_s": None if startup_s is None else round(startup_s, 2),
            "cpu_s": None if now_s is None else round(now_s, 2)}


def subtask_index(runtime_context) -> int:
    """The subtask's index (0 .. parallelism - 1); in thread mode asked of Flink 2's TaskInfo (see attempt_number)."""
    try:
        return int(runtime_context.get_index_of_this_subtask())
    except Exception:
        return int(runtime_context._runtime_context.getTaskInfo().getIndexOfThisSubtask())


def attempt_number(runtime_context) -> int:
    """The subtask's execution attempt (0 first; one more at each restart of its task). PyFlink 2.x's thread
    mode asks Flink's RuntimeContext for getAttemptNumber, which Flink 2 moved to its TaskInfo."""
    try:
        return int(runtime_context.get_attempt_number())
    except Exception:        # thread mode: the Java RuntimeContext's own call (pemja raises its own errors)
        return int(runtime_context._runtime_context.getTaskInfo().getAttemptNumber())


def _events(closed) -> int:
    """Accepted events in closed windows' increments."""
    return sum(inc.events for _, increments in closed for inc in increments)


class RecommendOnlineSynced(RecommendOnline):
    """:class:`RecommendOnline` for replicas of one model (parallelism > 1).

    Each replica learns from its own users' windows. After a call it sends what its learning changed in
    the shared variables to the sync topic itself (:class:`SyncSender`; once it has learned
    ``flink.replica_sync_events`` events since its last send); before a call it reads the topic itself
    (:class:`SyncFeed`, beside Flink's inputs: read as a second Flink input, deltas waited behind the
    operator's backlog), waits for the others to catch up (``flink.replica_sync_wait_ms``) and applies
    every other replica's deltas that have arrived, in each sender's sequence, as far as their events
    precede the first window the call lists (:class:`SyncInbox`).

    Exact restore: a replica's snapshot is taken only right after a send, with its :class:`ReplicaState`
    (what it applied, where its reading goes on) beside it; the applies and sends since are logged with
    the calls. A restore re-reads the topic from those positions and re-does calls, applies and sends in
    their logged order, so it comes back to exactly the checkpoint's model. The topic is at least once
    and read uncommitted (docs/ARCHITECTURE.md says why): a copy of a delta is dropped by its sequence
    number. After a failure every replica restores from one checkpoint in a new *life* (the job's build
    time and the task's attempt) and sends the numbers it sent after the checkpoint again, with other
    contents: a receiver applies a sender's deltas of the failed life only up to the count the sender's
    marker says it restored (:class:`SyncInbox`), and the new ones after.

    ``since_ms``: when the job was built. A fresh replica reads the topic from there, and the replicas
    started from scratch by the job form one exchange (``run``); restored ones keep theirs. (A job that
    fails before its first checkpoint restarts every replica from scratch in the same exchange, in a new
    life that begins at 0: what its first attempt sent is void.)

    ``seeds`` (a job resumed at a larger parallelism than its savepoint's shards: ``savepoints.rescaled_shards``):
    new shard key -> the old shard whose users it takes over. The old shard's replica, once loaded, sends a
    delta and then its whole model (a *seed*: :func:`seed_records`); the new replica waits for it, starts
    from that copy in the old one's exchange (the users that moved keep their rows, histories and seen
    items) and writes it to its state at once, so that any checkpoint holds it.
    """

    def __init__(self, cfg: Config, since_ms: int, senders, seeds: dict[int, int] | None = None,
                 subtasks: dict[int, int] | None = None):
        super().__init__(cfg)
        self.since_ms = int(since_ms)
        self.senders = sorted(int(k) for k in senders)      # every replica's shard key
        self.seeds = {int(new): int(old) for new, old in (seeds or {}).items()}
        self.subtasks = {int(k): int(j) for k, j in (subtasks or {}).items()}   # shard key -> its subtask

    def open(self, runtime_context):
        super().open(runtime_context)
        from freshet.ops.kafka_io import SyncFeed, SyncSender
        # The replica's ReplicaState as of the snapshot (JSON), and what it did since, in order with the
        # flush log's calls: "apply <call> <sender> <seq>" (before that call), "send <call>" (after it).
        self.sync_meta = runtime_context.get_list_state(ListStateDescriptor("sync", Types.STRING()))
        self.sync_log = runtime_context.get_list_state(ListStateDescriptor("sync_log", Types.STRING()))
        self.run = str(self.since_ms)    # the exchange of replicas started from scratch by this job
        # This replica's life: the job and the attempt (a failover restarts every replica's task as the next
        # attempt, all from one checkpoint; a resume is a new job). Deltas of earlier lives: SyncInbox.
        self.life = (self.since_ms, attempt_number(runtime_context))
        self.feed = SyncFeed(self.cfg, self.since_ms)    # started once the shard's state is known
        self.sender = SyncSender(self.cfg)
        self.inboxes: dict[int, SyncInbox] = {}          # shard key -> its inbox (one shard per subtask)
        self.received = 0                                # other replicas' deltas read (copies not counted)
        self.restore_wait_s = 120.0                      # for a logged delta to be read again on restore
        self.arrival_lag_ms: list[float] = []            # sent -> read here, since the last metrics record
        self.seed_parts = SeedParts()                    # a rescale: old replicas' copies, for the new ones here
        here = subtask_index(runtime_context)
        self.seeds_here = {new: old for new, old in self.seeds.items() if self.subtasks.get(new, here) == here}

    def close(self):
        self.feed.close()
        self.sender.close()

    # ---- the replica's part of restore, calls and snapshots (hooks of RecommendOnline) -------------
    def _shard(self, key: int) -> Shard:
        """Once a shard is loaded (restored or new), its marker opens its life for the others (SyncInbox)."""
        loaded = key in self.shards
        shard = super()._shard(key)
        if not loaded:
            self.sender.send(str(shard.key), shard.sync.begin(self.life, time.time() * 1000))
            if shard.key in self.seeds.values():
                self._send_seed(shard)
        return shard

    def _send_seed(self, shard: Shard) -> None:
        """A rescale: new replicas take over some of this one's users and start from a copy of it. A send first
        (logged like any), so the model is its sync base and the copy's own deltas start from zero."""
        self._send(shard, shard.restored_upto, shard.restored_upto, flush=True)
        positions = self.inboxes[shard.key].positions(self.feed.positions())
        for text in seed_records(shard.sync, positions, shard.model.to_bytes()):
            self.sender.send(str(shard.key), text)

    def _await_seed(self, key: int) -> tuple[ReplicaState, bytes]:
        """The copy of its old shard that a new replica starts from, sent in this life (:meth:`_send_seed`)."""
        source, deadline = self.seeds[key], time.monotonic() + self.restore_wait_s
        if not self.feed.next:
            self.feed.start({})     # from the job's start: the seed is sent after it
        while (seed := self.seed_parts.take(source, self.life, own=key)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"model shard {key} is new at this parallelism and starts from a copy of shard {source}, "
                                   f"which was not on the sync topic {self.cfg.kafka.sync_topic!r} within "
                                   f"{self.restore_wait_s:.0f}s (shard {source} sends it once its first window or timer "
                                   "reaches it after the resume)")
            self._read_feed(timeout=1.0)
        return seed

    def _seeded(self, key: int) -> None:
        """``key`` is loaded, from its copy or (restored after its first checkpoint) from its own state: once every
        new replica here is, the seeds read of its source (sent again at each of the source's loads) go."""
        source = self.seeds_here.pop(key, None)
        if source is not None and source not in self.seeds_here.values():
            self.seed_parts.drop(source)

    def _replica_restored(self, shard: Shard) -> dict:
        """Start the sync from the loaded model (a snapshot is always taken right after a send, so it is the
        base), with the ReplicaState kept beside it, and read the topic from where that state says; returns
        its logged steps by call."""
        meta = next(iter(self.sync_meta.get() or []), None)
        logged = list(self.sync_log.get() or [])
        seeded = meta is None and not logged and shard.key in self.seeds
        if seeded:      # new at this parallelism: a copy of its old shard (the fresh model is not used)
            shard.sync, blob = self._await_seed(shard.key)
            shard.model = model_class(self.cfg).from_bytes(blob, self.cfg.model)
        self._seeded(shard.key)
        if not seeded:
            shard.sync = ReplicaState.from_text(meta) if meta else ReplicaState(own=shard.key, run=self.run)
        shard.model.start_sync()
        shard.sync.life = self.life
        wanted = [shard.sync.positions] + [inbox.positions(self.feed.positions()) for inbox in self.inboxes.values()]
        self.inboxes[shard.key] = SyncInbox(shard.sync)
        self.feed.start({p: min(w[p] for w in wanted) for p in set.intersection(*(set(w) for w in wanted))})
        if meta is None and not logged:
            # A fresh replica: its exchange (run) and where it began to read go into its state at once. A job
            # resumed from a savepoint taken before the first snapshot must re-read the deltas that its log says
            # were applied; with the resumed job's own run it would skip them all and wait for them in vain.
            # A seeded one's model too: a checkpoint without it would restore its later calls onto a fresh model.
            shard.sync.positions = self.feed.positions()
            self.sync_meta.add(shard.sync.to_text())
            if seeded:
                self.model_state.add(base64.b64encode(blob).decode("ascii"))
        steps: dict[int, list[list[str]]] = {}
        for entry in logged:
            step = entry.split()
            steps.setdefault(int(step[1]), []).append(step)
        return steps

    def _replica_redo(self, shard: Shard, steps) -> None:
        """Re-do a replica's logged sync steps: apply the same deltas (read again from the topic) and export
        again where it sent (the export moves its base; the record went out before the checkpoint)."""
        for step in steps:
            if step[0] == "apply":
                rec = self._await(shard, int(step[2]), int(step[3]))
                shard.model.apply_shared(SharedDelta.from_bytes(rec.payload()))
            else:       # "send <call> [<min_change>]": the threshold it exported with (none logged before stop 33: 0)
                if self._sends(self._export(shard, float(step[2]) if len(step) > 2 else 0.0)):
                    shard.sync.sent += 1
                shard.sync.unsent_events = 0

    def _await(self, shard: Shard, sender: int, seq: int):
        """A delta the log says was applied, read again from the topic."""
        inbox, deadline = self.inboxes[shard.key], time.monotonic() + self.restore_wait_s
        while (rec := inbox.take(sender, seq)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"restore of model shard {shard.key}: delta {seq} of replica {sender} is logged "
                                   f"as applied but was not found on the sync topic {self.cfg.kafka.sync_topic!r} "
                                   f"from {shard.sync.positions} within {self.restore_wait_s:.0f}s (deleted or expired?)")
            self._read_feed(timeout=1.0)
        return rec

    def _read_feed(self, timeout: float = 0.0) -> None:
        now = time.time() * 1000
        for partition, offset, record in self.feed.poll(timeout):
            if is_seed(record):
                text = record.decode() if isinstance(record, bytes) else record
                if int(text.split(" ", 2)[1]) in self.seeds_here.values():
                    self.seed_parts.add(text)
                continue
            for inbox in self.inboxes.values():
                if (rec := inbox.add(partition, offset, record)) is not None:
                    self.received += 1
                    self.arrival_lag_ms.append(now - rec.sent_at)

    def _replica_learned(self, shard: Shard, closed) -> None:
        shard.sync.unsent_events += _events(closed)

    def _replica_before_call(self, shard: Shard, closed) -> None:
        """Every other replica's deltas read so far, each sender's in sequence from the one after its last
        applied, as far as they hold only events before the call's first window; logged for a restore."""
        self._read_feed()
        if self.cfg.flink.replica_sync_wait_ms and shard.sync_target is not None:
            self._wait_for_others(shard)
        now, cpu = time.time() * 1000, time.thread_time()
        for rec in self.inboxes[shard.key].due(before=closed[0][0]):
            shard.model.apply_shared(SharedDelta.from_bytes(rec.payload()))
            self.sync_log.add(f"apply {shard.logged_calls} {rec.sender} {rec.seq}")
            shard.sync_applied += 1
            shard.sync_lag_ms.append(now - rec.sent_at)
        shard.sync_cpu_s["apply"] += time.thread_time() - cpu

    def _calls(self, shard: Shard, closed) -> list:
        """With ``flink.replica_sync_events`` > 0, calls of at most about that many events (whole windows), so
        that the replica sends and applies at least that often however many windows one watermark closes."""
        every = self.cfg.flink.replica_sync_events
        if not every:
            return super()._calls(shard, closed)
        calls, part, events = [], [], shard.sync.unsent_events
        for window in closed:
            part.append(window)
            events += _events([window])
            if events >= every:
                calls.append(part)
                part, events = [], 0
        return calls + [part] if part else calls

    def _sends(self, delta) -> bool:
        """Whether an export goes out: when it changed anything, or always when others wait for its progress."""
        return not delta.empty or self.cfg.flink.replica_sync_wait_ms > 0

    def _wait_for_others(self, shard: Shard) -> None:
        """Bounded staleness: until every other replica has learned its windows before this replica's progress
        at its last send (so its deltas of them can be applied now), for at most ``flink.replica_sync_wait_ms``."""
        inbox, started = self.inboxes[shard.key], time.monotonic()
        deadline = started + self.cfg.flink.replica_sync_wait_ms / 1000
        others = [s for s in self.senders if s != shard.key]
        while any(inbox.progress.get(s, -1) < shard.sync_target for s in others):
            if time.monotonic() >= deadline:
                shard.sync_wait_timeouts += 1
                break
            self._read_feed(timeout=0.01)
        shard.sync_wait_s += time.monotonic() - started

    def _replica_after_call(self, shard: Shard, closed) -> None:
        """Send this replica's changes since it last sent, once it has learned ``flink.replica_sync_events``
        events since."""
        self._replica_learned(shard, closed)
        if shard.sync.unsent_events < max(self.cfg.flink.replica_sync_events, 1):
            return
        upto = closed[-1][0]     # the timer's last call (its window is the last closed) has learned every window
        self._send(shard, upto, max(upto, shard.watermark + 1) if upto == max(shard.closed_at) else upto)

    def _replica_idle(self, shard: Shard) -> None:
        """A timer with no window of this replica's (its heartbeat): while others wait for its progress, it
        tells them how far it has got, with whatever it has not sent yet (a send, logged like any)."""
        progress = shard.watermark + 1
        if self.cfg.flink.replica_sync_wait_ms and (shard.sync_target is None or progress > shard.sync_target):
            self._send(shard, progress, progress)

    @staticmethod
    def _export(shard: Shard, min_change: float):
        """The shard's changes since its last export (holding back those up to ``min_change``), sent or redone."""
        shard.sync_flushed = not min_change
        return shard.model.export_shared(min_change)

    def _send(self, shard: Shard, upto: int, progress: int, flush: bool = False) -> None:
        """Export this replica's changes since its last send and send them as its next sync record (logged for
        a restore, with the threshold it used; the send returns once the broker has it).

        With ``flink.replica_sync_min_change`` > 0 a row goes out once one of its values moved more than that
        since it last went out; the rest waits in the difference to the sync base. A send before a snapshot
        (or a seed: ``flush``) sends every change, so that a snapshot's model is its sync base, as a restore
        assumes."""
        cpu = time.thread_time()
        min_change = 0.0 if flush or self._snapshot_due(shard) else self.cfg.flink.replica_sync_min_change
        self.sync_log.add(f"send {shard.logged_calls} {min_change!r}" if min_change else f"send {shard.logged_calls}")
        shard.sync.unsent_events = 0
        delta = self._export(shard, min_change)
        if self._sends(delta):
            shard.sync_target = progress
            record = shard.sync.record(delta.to_bytes(), time.time() * 1000, upto=upto, progress=progress)
            shard.sync_bytes += len(record)
            self.sender.send(str(shard.key), record)
        shard.sync_cpu_s["send"] += time.thread_time() - cpu

    def _arm(self, shard: Shard, ctx, window_end: int | None = None) -> None:
        """Also, after a timer, while others may wait for this replica's progress, a timer at the next window end
        after the watermark (its heartbeat): a replica whose users have no window there still reports its
        progress. (Not per window row: the first row's window timer fires first, and no JVM call per row.)"""
        super()._arm(shard, ctx, window_end)
        watermark, size = shard.watermark, self.cfg.window.size_ms
        if window_end is not None or not self.cfg.flink.replica_sync_wait_ms or watermark >= END_OF_INPUT - 2 * size:
            return
        beat = (max(watermark, 0) + 1) // size * size + size - 1
        if beat != shard.heartbeat:
            ctx.timer_service().register_event_time_timer(beat)
            shard.heartbeat = beat

    def _replica_snapshot(self, shard: Shard) -> bool:
        """Only right after a send of every change (the sync base is then the model), with the ReplicaState
        beside it."""
        if shard.sync.unsent_events or not shard.sync_flushed:
            return False
        shard.sync.positions = self.inboxes[shard.key].positions(self.feed.positions())
        self.sync_meta.clear()
        self.sync_meta.add(shard.sync.to_text())
        self.sync_log.clear()
        return True

    def _metrics(self, shard: Shard, watermark: int) -> dict:
        """Adds the exchange: deltas sent (and bytes) and applied since (re)start, per sender; the send -> apply
        lag of those applied, the send -> read lag of those read, since the last record (ms), and how many wait
        (read, but a gap or their events' time keeps them)."""
        lag, shard.sync_lag_ms = shard.sync_lag_ms, []
        arrived, self.arrival_lag_ms = self.arrival_lag_ms, []
        return {**super()._metrics(shard, watermark),
                "sync_sent": shard.sync.sent, "sync_bytes_sent": shard.sync_bytes,
                "sync_applied": shard.sync_applied, "sync_applied_of": dict(sorted(shard.sync.applied.items())),
                "attempt": self.life[1], "sync_base": shard.sync.base,
                "sync_lag_ms_mean": round(sum(lag) / len(lag), 1) if lag else None,
                "sync_lag_ms_max": round(max(lag), 1) if lag else None,
                "sync_received": self.received, "sync_arrival_lag_ms_max": round(max(arrived), 1) if arrived else None,
                "sync_waiting": len(self.inboxes[shard.key].waiting),
                "sync_wait_s": round(shard.sync_wait_s, 2), "sync_wait_timeouts": shard.sync_wait_timeouts,
                "sync_apply_cpu_s": round(shard.sync_cpu_s["apply"], 2),
                "sync_send_cpu_s": round(shard.sync_cpu_s["send"], 2)}
