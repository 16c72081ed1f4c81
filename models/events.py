"""Behaviour events (CONTRACTS §1): parsing, validation and dead-letter records. No Flink, no TensorFlow.

>>> from freshet.conf.settings import EventsConfig
>>> v = EventValidator(EventsConfig())
>>> v.parse(b'{"user_id": 42, "item_id": "i1", "behavior": "click", "ts": 1700000000000}', now_ms=1700000000000)
Event(user_id='42', item_id='i1', behavior='click', ts=1700000000000, value=None, event_id=None, weight=2.0)
>>> v.parse(b'{"user_id": "u1"}', now_ms=0).reason
"missing_field: 'item_id' is required"
"""
from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

from freshet.conf.settings import EventsConfig


class Event(NamedTuple):
    user_id: str
    item_id: str
    behavior: str
    ts: int
    value: float | None
    event_id: str | None
    weight: float


class Rejection(NamedTuple):
    """Why a record is not an event; ``code`` is one of :data:`REASONS`."""
    code: str
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


REASONS = ("oversize", "not_utf8", "invalid_json", "not_object", "missing_field", "wrong_type", "bad_id",
           "unknown_behavior", "negative_ts", "future_ts", "duplicate", "late")


def dead_letter(reason: str, raw: bytes | None, topic: str, partition: int, offset: int) -> str:
    """The dead-letter record (CONTRACTS §1) as JSON text; ``raw`` is base64 when not valid UTF-8."""
    raw = raw or b""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = base64.b64encode(raw).decode("ascii")
    return json.dumps({"reason": reason, "raw": text, "topic": topic, "partition": int(partition),
                       "offset": int(offset)}, ensure_ascii=False)


@dataclass
class EventValidator:
    """Turns a Kafka record value into an :class:`Event` or a :class:`Rejection`.

    Stateless: duplicates and lateness need memory of the stream; the job checks them in Flink (SQL).
    """
    cfg: EventsConfig

    def __post_init__(self):
        self._behaviors = frozenset(self.cfg.behaviors)

    def _id(self, obj: dict, name: str) -> str | Rejection:
        if name not in obj or obj[name] is None:
            return Rejection("missing_field", f"'{name}' is required")
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return Rejection("wrong_type", f"'{name}' must be a string or an integer, got {type(value).__name__}")
        text = value if isinstance(value, str) else str(value)
        size = len(text.encode("utf-8", "surrogatepass"))
        if not 1 <= size <= self.cfg.max_id_bytes:
            return Rejection("bad_id", f"'{name}' must be 1..{self.cfg.max_id_bytes} bytes, got {size}")
        return text

    def parse(self, raw: bytes | None, now_ms: int) -> Event | Rejection:
        if raw is None:
            return Rejection("invalid_json", "record has no value")
        if len(raw) > self.cfg.max_message_bytes:
            return Rejection("oversize", f"{len(raw)} bytes > max_message_bytes {self.cfg.max_message_bytes}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Rejection("not_utf8", str(e))
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            return Rejection("invalid_json", str(e)[:200])
        if not isinstance(obj, dict):
            return Rejection("not_object", f"expected a JSON object, got {type(obj).__name__}")
        user = self._id(obj, "user_id")
        if isinstance(user, Rejection):
            return user
        item = self._id(obj, "item_id")
        if isinstance(item, Rejection):
            return item
        behavior = obj.get("behavior")
        if behavior is None:
            return Rejection("missing_field", "'behavior' is required")
        if not isinstance(behavior, str):
            return Rejection("wrong_type", f"'behavior' must be a string, got {type(behavior).__name__}")
        if behavior not in self._behaviors:
            return Rejection("unknown_behavior", f"{behavior[:64]!r} is not one of {sorted(self._behaviors)}")
        ts = obj.get("ts")
        if ts is None:
            return Rejection("missing_field", "'ts' is required")
        if isinstance(ts, bool) or not isinstance(ts, int):
            return Rejection("wrong_type", f"'ts' must be an integer (epoch ms), got {type(ts).__name__}")
        if ts < 0:
            return Rejection("negative_ts", f"ts {ts} < 0")
        if ts > now_ms + self.cfg.max_future_ms:
            return Rejection("future_ts", f"ts {ts} is more than {self.cfg.max_future_ms} ms after now ({now_ms})")
        value = obj.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return Rejection("wrong_type", f"'value' must be a finite number, got {value!r}"[:200])
            value = float(value)
        event_id = obj.get("event_id")
        if event_id is not None:
            if not isinstance(event_id, str):
                return Rejection("wrong_type", f"'event_id' must be a string, got {type(event_id).__name__}")
            if not 1 <= len(event_id.encode("utf-8", "surrogatepass")) <= self.cfg.max_id_bytes:
                return Rejection("bad_id", f"'event_id' must be 1..{self.cfg.max_id_bytes} bytes")
        return Event(user, item, behavior, ts, value, event_id, self.weight(behavior, value))

    def weight(self, behavior: str, value: float | None) -> float:
        """The positive-signal weight of one event (``rate`` below ``rate_min_value`` weighs 0)."""
        if behavior == "rate" and value is not None and value < self.cfg.rate_min_value:
            return 0.0
        return float(self.cfg.weights[behavior])
