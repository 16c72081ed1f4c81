"""parse_event: the exact validator for records the JVM fast path did not accept (a table function).

Canonical records (see ``jobs.tables.canonical_event_pattern``) are parsed in the JVM and never reach
Python. Everything else comes here, one call per record, and leaves as either an event
``(user_id, item_id, ts, weight, event_id, NULL)`` or a dead letter ``(NULL, ..., json)`` with the
validator's reason (CONTRACTS §1). Events carrying an ``event_id`` are never canonical, so they all pass
here; duplicates are then caught in the JVM, in Flink state keyed by ``event_id``
(``jobs.tables.copies_query``). Lateness is checked after that, in SQL, for all events alike.
"""
from __future__ import annotations

import time

from pyflink.table import DataTypes
from pyflink.table.udf import TableFunction, udtf

from freshet.conf.settings import EventsConfig
from freshet.models.events import EventValidator, Rejection, dead_letter

RESULT_TYPES = [DataTypes.STRING(), DataTypes.STRING(), DataTypes.BIGINT(), DataTypes.DOUBLE(), DataTypes.STRING(),
                DataTypes.STRING()]
RESULT_NAMES = ["user_id", "item_id", "ts", "weight", "event_id", "dead_letter"]


class ParseEvents(TableFunction):
    def __init__(self, events: EventsConfig, window_ms: int):
        self.events_cfg = events
        self.window_ms = window_ms

    def open(self, function_context):
        self.validator = EventValidator(self.events_cfg)
        metrics = function_context.get_metric_group()
        self.accepted = metrics.counter("events_accepted_by_python")
        self.rejected = metrics.counter("events_dead_lettered")

    def eval(self, value, topic, partition, offset):
        event = self.validator.parse(value, int(time.time() * 1000))
        if not isinstance(event, Rejection):
            self.accepted.inc()
            yield event.user_id, event.item_id, event.ts, event.weight, event.event_id, None
            return
        self.rejected.inc()
        yield None, None, None, None, None, dead_letter(event.reason, value, topic, partition, offset)


def parse_event_function(events: EventsConfig, window_ms: int):
    """The table function to register (``t_env.create_temporary_function``)."""
    return udtf(ParseEvents(events, window_ms), result_types=RESULT_TYPES)
