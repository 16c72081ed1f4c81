"""RecommendOnline: increments -> micro-batch training steps -> top-K lists when their window closes."""
from __future__ import annotations

import json
import time

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction

from freshet.conf.settings import Config
from freshet.models.increments import Increment, MicroBatcher

# What leaves this function: (Kafka key, Kafka value) of one recommendation (CONTRACTS §2).
RECOMMENDATION_TYPE = Types.ROW_NAMED(["user_id", "payload"], [Types.STRING(), Types.STRING()])


def build_model(cfg: Config):
    """The model behind the job (built in the worker, so TensorFlow never loads in the client)."""
    from freshet.models.online_mf import OnlineMF
    return OnlineMF(cfg.model)


class RecommendOnline(KeyedProcessFunction):
    """Keyed by user. Holds one model per subtask; increments of many users share each micro-batch.

    A micro-batch is trained as soon as ``model.batch_size`` increments are buffered, and at the latest
    when the watermark passes the end of their window (an event-time timer at ``window_end - 1``). Then
    every user with an increment in that window gets one list reflecting all events before ``window_end``.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def open(self, runtime_context):
        self.model = build_model(self.cfg)
        self.batcher = MicroBatcher(self.cfg.model.batch_size)
        metrics = runtime_context.get_metrics_group()
        self.steps = metrics.counter("train_steps")
        self.emitted = metrics.counter("recommendations_emitted")
        self.last_step_ms = 0
        metrics.gauge("last_train_step_ms", lambda: int(self.last_step_ms))
        metrics.gauge("model_version", lambda: int(self.model.version))

    def process_element(self, row, ctx):
        inc = Increment.from_json(row[0], row[1], row[2], self.cfg.window.max_items_per_increment)
        batch = self.batcher.add(inc)
        if batch:
            self._learn(batch)
        ctx.timer_service().register_event_time_timer(inc.window_end - 1)

    def on_timer(self, timestamp, ctx):
        rest, due = self.batcher.close_window(timestamp + 1)
        if rest:
            self._learn(rest)
        if due:
            yield from self._emit(due)

    def _learn(self, batch):
        stats = self.model.learn_many(batch)
        self.steps.inc()
        self.last_step_ms = stats.seconds * 1000

    def _emit(self, due):
        k, version = self.cfg.model.k, self.model.version
        users = [u for u, _ in due]
        lists = self.model.recommend(users, k, exclude_seen=self.cfg.model.exclude_seen)
        emitted_at = int(time.time() * 1000)
        for (user, window_end), rec in zip(due, lists):
            payload = {"user_id": user, "items": rec.items, "scores": rec.scores, "window_end": window_end,
                       "model_version": version, "emitted_at": emitted_at}
            yield Row(user, json.dumps(payload, ensure_ascii=False))
        self.emitted.inc(len(due))
