"""ParseEvents: raw Kafka records -> validated events; everything else -> dead-letter side output."""
from __future__ import annotations

import time

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import OutputTag, ProcessFunction

from freshet.conf.settings import EventsConfig, WindowConfig
from freshet.models.events import EventValidator, Rejection, StreamGuard, dead_letter

# What leaves this function on the main output: one accepted event, reduced to what windowing needs.
EVENT_TYPE = Types.ROW_NAMED(["user_id", "item_id", "ts", "weight"],
                             [Types.STRING(), Types.STRING(), Types.LONG(), Types.DOUBLE()])
# Dead letters (CONTRACTS §1), as JSON text.
DEAD_LETTERS = OutputTag("dead-letters", Types.STRING())


class ParseEvents(ProcessFunction):
    """Input rows are ``(value: bytes, topic, partition, offset)`` as read by the Kafka table source."""

    def __init__(self, events: EventsConfig, window: WindowConfig):
        self.events_cfg = events
        self.window_cfg = window

    def open(self, runtime_context):
        self.validator = EventValidator(self.events_cfg)
        self.guard = StreamGuard(self.window_cfg.size_ms, self.events_cfg.dedup_horizon_ms)
        metrics = runtime_context.get_metrics_group()
        self.accepted = metrics.counter("events_accepted")
        self.rejected = metrics.counter("events_dead_lettered")

    def process_element(self, row, ctx):
        value, topic, partition, offset = row[0], row[1], row[2], row[3]
        event = self.validator.parse(value, int(time.time() * 1000))
        if not isinstance(event, Rejection):
            code = self.guard.check(event.ts, event.event_id, ctx.timer_service().current_watermark())
            if code is None:
                self.accepted.inc()
                yield Row(event.user_id, event.item_id, event.ts, event.weight)
                return
            detail = (f"event_id {event.event_id!r} already seen" if code == "duplicate"
                      else f"ts {event.ts} is behind the watermark: its window has closed")
            event = Rejection(code, detail)
        self.rejected.inc()
        yield DEAD_LETTERS, dead_letter(event.reason, value, topic, partition, offset)
