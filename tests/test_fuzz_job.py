"""Property-based bad input through the real job: 10,000+ generated records, good and malformed mixed.

Hypothesis draws the malformed records (invalid JSON, wrong types, missing fields, empty and huge ids, non-UTF-8
bytes, unknown behaviours, negative and far-future timestamps, oversize values, repeated event ids,
very late events); one bounded job on a real broker processes them. Then every record is accounted
for: each malformed one is in the dead-letter topic with its reason, each good one made it into its
user's window list, and nothing is in both or in neither.
"""
from __future__ import annotations

import json
import uuid
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from freshet.models.events import EventValidator, Rejection
from freshet.ops import kafka_io

from .lists import assert_one_list_per_user_window

pytestmark = pytest.mark.integration

N_RECORDS = 10_000
T0 = 1_700_000_000_000
STEP_MS = 150                    # good events advance event time by this much each
BEHAVIORS = ["view", "click", "cart", "fav", "buy", "rate"]


MALFORMED_KINDS = ["text", "binary", "array", "missing", "wrong_type", "empty_id", "huge_id", "behavior",
                   "negative_ts", "future_ts", "oversize", "float_ts"]


def malformed(draw, ts, kind) -> bytes:
    """One record of ``kind`` that is not an event; hypothesis draws its content."""
    base = {"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": ts}
    if kind == "text":
        return draw(st.text(max_size=40)).encode("utf-8", "surrogatepass") + b"{"
    if kind == "binary":
        return b"\xff" + draw(st.binary(max_size=40))
    if kind == "array":
        return json.dumps(draw(st.lists(st.integers(), max_size=3))).encode()
    if kind == "missing":
        del base[draw(st.sampled_from(sorted(base)))]
    elif kind == "wrong_type":
        base[draw(st.sampled_from(sorted(base)))] = draw(st.one_of(
            st.none(), st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            st.floats(allow_nan=False, allow_infinity=False)))
    elif kind == "empty_id":
        base[draw(st.sampled_from(["user_id", "item_id"]))] = ""
    elif kind == "huge_id":
        base[draw(st.sampled_from(["user_id", "item_id"]))] = "x" * draw(st.integers(257, 5000))
    elif kind == "behavior":
        base["behavior"] = draw(st.text(min_size=1, max_size=10).filter(lambda b: b not in BEHAVIORS))
    elif kind == "negative_ts":
        base["ts"] = draw(st.integers(-10**15, -1))
    elif kind == "future_ts":
        base["ts"] = draw(st.integers(10**14, 10**17))
    elif kind == "oversize":
        base["pad"] = "y" * 70_000
    elif kind == "float_ts":
        base["ts"] = ts + 0.5
    return json.dumps(base).encode()


def build_records(bad_pool: list[bytes], seed: int) -> list[tuple[str, bytes]]:
    """N_RECORDS records in production order: ~70 % good events (ascending ts), the rest malformed ones
    from hypothesis' pool, replays of earlier event ids, and very late events. (kind, value) pairs."""
    rng = np.random.default_rng(seed)
    records, goods = [], []
    for n in range(N_RECORDS):
        ts = T0 + n * STEP_MS
        roll = rng.integers(100)
        if roll < 70 or not bad_pool:
            event = {"user_id": f"u{rng.integers(40)}" if rng.random() < 0.7 else int(rng.integers(60)),
                     "item_id": f"i{rng.integers(150)}", "behavior": BEHAVIORS[rng.integers(6)], "ts": ts}
            if rng.random() < 0.5:
                event["value"] = float(rng.integers(0, 6))
            if rng.random() < 0.5:
                event["event_id"] = f"e{n}"
                goods.append(event)
            records.append(("good", json.dumps(event).encode()))
        elif roll < 75 and goods:                # a replay of a recent event id
            records.append(("duplicate", json.dumps(goods[-1 - rng.integers(min(len(goods), 30))]).encode()))
        elif roll < 78 and n > N_RECORDS // 2:  # very late: minutes to hours behind the stream
            late = {"user_id": "late-user", "item_id": "i1", "behavior": "view", "ts": T0 + n * STEP_MS // 4}
            records.append(("late", json.dumps(late).encode()))
        else:
            records.append(("malformed", bad_pool[rng.integers(len(bad_pool))]))
    return records


# One example (a real job per example is expensive), no shrinking or replay (the topics are not reusable).
@seed(20261123)
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_ten_thousand_generated_records_are_each_processed_or_dead_lettered(topics_cfg, data):
    from freshet.ops.runner import run_job
    # Topics of its own per execution (hypothesis runs a failing example again to report it); one
    # partition, so offsets are production order.
    tag = f"{topics_cfg.kafka.input_topic}-fuzz-{uuid.uuid4().hex[:6]}"
    cfg = topics_cfg.replace(kafka={"partitions": 1, "input_topic": tag, "output_topic": f"{tag}-recs",
                                    "dlq_topic": f"{tag}-dlq", "metrics_topic": f"{tag}-metrics",
                                    "sync_topic": f"{tag}-sync"},
                             flink={"transactional_id_prefix": tag})
    kafka_io.ensure_topics(cfg)
    validator = EventValidator(cfg.events)
    pool = [malformed(data.draw, T0, MALFORMED_KINDS[j % len(MALFORMED_KINDS)]) for j in range(480)]
    records = build_records(pool, seed=data.draw(st.integers(0, 2**32 - 1)))

    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    for _, value in records:
        prod.produce(cfg.kafka.input_topic, value=value, partition=0, on_delivery=report)
    kafka_io.flush_or_fail(prod, report)

    run_job(cfg, bounded=True)      # must not fail, whatever the input

    dead = kafka_io.read_json(cfg, cfg.kafka.dlq_topic)
    lists = [(r["user_id"], r["window_end"]) for r in kafka_io.read_json(cfg, cfg.kafka.output_topic)]
    by_offset = {d["offset"]: d["reason"].split(":")[0] for d in dead}
    assert len(by_offset) == len(dead), "each record is dead-lettered at most once"

    window = cfg.window.size_ms
    now_ms = int(time.time() * 1000)
    expected_lists = set()
    for offset, (kind, value) in enumerate(records):
        parsed = validator.parse(value, now_ms=now_ms)
        got = by_offset.get(offset)
        if isinstance(parsed, Rejection):
            assert kind == "malformed", (kind, value[:80], parsed)
            assert got == parsed.code, f"record {offset} {value[:80]!r}: dead letter {got!r}, expected {parsed.code!r}"
            continue
        allowed = {"good": {None}, "duplicate": {"duplicate", "late"}, "late": {"late", None},
                   "malformed": {None, "late"}}[kind]   # a "malformed" draw the validator accepts
        assert got in allowed, f"record {offset} ({kind}) {value[:80]!r}: dead letter {got!r}"
        if got is None:
            expected_lists.add((parsed.user_id, parsed.ts - parsed.ts % window + window))
    assert_one_list_per_user_window(lists, expected_lists)
    reasons = Counter(by_offset.values())
    print(f"\n{len(records)} records: {len(records) - len(dead)} accepted, dead letters {dict(reasons)}")
    assert reasons["late"] > 0, "very late events must be dead-lettered as late"
    assert {"invalid_json", "not_utf8", "wrong_type", "missing_field", "bad_id", "duplicate"} <= set(reasons)
