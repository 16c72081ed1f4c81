"""RecommendOnline: increments -> micro-batch training steps -> top-K lists when their window closes."""
from __future__ import annotations

import json
import time

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction

from freshet.conf.settings import Config
from freshet.models.evaluation import LiveHitRate
from freshet.models.increments import Increment, WindowBuffer

# What leaves this function: (Kafka key, Kafka value) of one recommendation (CONTRACTS §2).
RECOMMENDATION_TYPE = Types.ROW_NAMED(["user_id", "payload"], [Types.STRING(), Types.STRING()])


def build_model(cfg: Config):
    """The model behind the job (built in the worker, so TensorFlow never loads in the client)."""
    if cfg.model.kind == "popularity":
        from freshet.models.popularity import Popularity
        return Popularity(cfg.model)
    from freshet.models.online_mf import OnlineMF
    return OnlineMF(cfg.model)


class RecommendOnline(KeyedProcessFunction):
    """Keyed by user. Holds one model per subtask; increments of many users share each micro-batch.

    Increments wait in a buffer until the watermark passes their window's end (an event-time timer at
    ``window_end - 1``). Then all windows closed so far are handed to the model in one call, which, per
    window in order, takes one optimizer step per micro-batch of ``model.batch_size`` increments and
    lists the window's users, so each list reflects exactly the events before its ``window_end``.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def open(self, runtime_context):
        self.model = build_model(self.cfg)
        self.buffer = WindowBuffer()
        metrics = runtime_context.get_metrics_group()
        self.flushes = metrics.counter("model_calls")
        self.emitted = metrics.counter("recommendations_emitted")
        self.last_call_ms = 0.0
        metrics.gauge("last_model_call_ms", lambda: int(self.last_call_ms))
        self.live = LiveHitRate(self.cfg.model.k)
        metrics.gauge("live_hit_rate_ppm", lambda: int(self.live.hit_rate * 1_000_000))
        metrics.gauge("live_events", lambda: int(self.live.events))
        metrics.gauge("model_version", lambda: int(self.model.version))

    def process_element(self, row, ctx):
        inc = Increment.from_json(row[0], row[1], row[2], self.cfg.window.max_items_per_increment)
        self.buffer.add(inc)
        ctx.timer_service().register_event_time_timer(inc.window_end - 1)

    def on_timer(self, timestamp, ctx):
        closed = self.buffer.close(max(timestamp, ctx.timer_service().current_watermark()))
        if not closed:
            return  # another user's timer for the same window already flushed it
        started = time.perf_counter()
        lists = self.model.learn_windows(closed, self.cfg.model.batch_size, self.cfg.model.k,
                                         self.cfg.model.exclude_seen)
        self.last_call_ms = (time.perf_counter() - started) * 1000
        self.flushes.inc()
        emitted_at = int(time.time() * 1000)
        for wl in lists:
            payload = {"user_id": wl.user_id, "items": wl.rec.items, "scores": wl.rec.scores,
                       "window_end": wl.window_end, "model_version": wl.model_version, "emitted_at": emitted_at}
            yield Row(wl.user_id, json.dumps(payload, ensure_ascii=False))
        self.emitted.inc(len(lists))
        self._score_live(closed, lists)

    def _score_live(self, closed, lists):
        """Prequential, window by window: score a window's events, then remember its lists."""
        by_window: dict[int, list] = {}
        for wl in lists:
            by_window.setdefault(wl.window_end, []).append((wl.user_id, wl.rec.items))
        for window_end, increments in closed:
            self.live.score(increments)
            self.live.remember(by_window.get(window_end, []))
