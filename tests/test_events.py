import base64
import json

import pytest

from freshet.models.events import REASONS, Event, EventValidator, Rejection, dead_letter

NOW = 1_700_000_000_000


@pytest.fixture
def validator(cfg):
    return EventValidator(cfg.events)


def good(**over):
    rec = {"user_id": "u42", "item_id": "i1001", "behavior": "click", "ts": NOW, "value": 4.0, "event_id": "e-1"}
    rec.update(over)
    return json.dumps(rec).encode()


def test_valid_event_is_parsed_with_its_weight(validator):
    e = validator.parse(good(), NOW)
    assert e == Event("u42", "i1001", "click", NOW, 4.0, "e-1", 2.0)


def test_integer_ids_are_normalised_to_decimal_strings(validator):
    e = validator.parse(good(user_id=42, item_id=7), NOW)
    assert (e.user_id, e.item_id) == ("42", "7")


@pytest.mark.parametrize("raw, code", [
    (b"not json", "invalid_json"),
    (b"\xff\xfe\x00", "not_utf8"),
    (b"[1, 2]", "not_object"),
    (json.dumps({"item_id": "i", "behavior": "view", "ts": 1}).encode(), "missing_field"),
    (good(user_id=None), "missing_field"),
    (good(user_id=1.5), "wrong_type"),
    (good(user_id=True), "wrong_type"),
    (good(item_id=["x"]), "wrong_type"),
    (good(user_id=""), "bad_id"),
    (good(user_id="x" * 257), "bad_id"),
    (good(behavior="teleport"), "unknown_behavior"),
    (good(behavior=3), "wrong_type"),
    (good(ts="1700000000000"), "wrong_type"),
    (good(ts=1.7e12), "wrong_type"),
    (good(ts=-1), "negative_ts"),
    (good(ts=NOW + 2 * 86_400_000), "future_ts"),
    (good(value="4"), "wrong_type"),
    (good(event_id=12), "wrong_type"),
    (b"{" + b" " * 70000 + b"}", "oversize"),
    (None, "invalid_json"),
])
def test_bad_records_are_rejected_with_a_reason(validator, raw, code):
    r = validator.parse(raw, NOW)
    assert isinstance(r, Rejection) and r.code == code and r.code in REASONS
    assert r.reason.startswith(code + ": ") and len(r.reason) > len(code) + 2


def test_ids_are_limited_in_bytes_not_characters(validator):
    assert validator.parse(good(user_id="é" * 128), NOW).user_id == "é" * 128   # 256 bytes
    assert validator.parse(good(user_id="é" * 129), NOW).code == "bad_id"     # 258 bytes


def test_low_ratings_carry_no_positive_weight(cfg):
    v = EventValidator(cfg.replace(events={"rate_min_value": 3.0}).events)
    assert v.parse(good(behavior="rate", value=2.0), NOW).weight == 0.0
    assert v.parse(good(behavior="rate", value=4.0), NOW).weight == 1.0


def test_dead_letter_keeps_utf8_raw_and_base64_otherwise():
    ok = json.loads(dead_letter("invalid_json: x", b"hello \xc3\xa9", "t", 1, 9))
    assert ok == {"reason": "invalid_json: x", "raw": "hello é", "topic": "t", "partition": 1, "offset": 9}
    bad = json.loads(dead_letter("not_utf8: x", b"\xff\x00", "t", 0, 0))
    assert base64.b64decode(bad["raw"]) == b"\xff\x00"


