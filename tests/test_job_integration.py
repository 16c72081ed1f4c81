"""The job end to end on real parts: a real Kafka broker, the local Flink runtime, bounded input."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest

from freshet.ops import kafka_io

from .lists import assert_one_list_per_user_window

pytestmark = pytest.mark.integration

T0 = 1_700_000_040_000           # deliberately not window-aligned
WINDOW = 60_000
USERS = [f"u{j}" for j in range(6)]
ITEMS = [f"i{j}" for j in range(40)]

MALFORMED = {
    b"this is not json": "invalid_json",
    b"\xff\xfe\xfa not utf-8": "not_utf8",
    b'["an", "array"]': "not_object",
    json.dumps({"user_id": "u1", "behavior": "view", "ts": T0}).encode(): "missing_field",
    json.dumps({"user_id": 1.5, "item_id": "i1", "behavior": "view", "ts": T0}).encode(): "wrong_type",
    json.dumps({"user_id": "u1", "item_id": "i1", "behavior": "teleport", "ts": T0}).encode(): "unknown_behavior",
    json.dumps({"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": -5}).encode(): "negative_ts",
    json.dumps({"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 99_999_999_999_999}).encode(): "future_ts",
    json.dumps({"user_id": "x" * 300, "item_id": "i1", "behavior": "view", "ts": T0}).encode(): "bad_id",
}


def good_events():
    """Three windows; every user active in each; behaviours mixed; integer and string ids."""
    events, n = [], 0
    for w in range(3):
        for step in range(3):
            for j, user in enumerate(USERS):
                n += 1
                ts = T0 + w * WINDOW + step * 7_000 + j * 100
                events.append({"user_id": user, "item_id": ITEMS[(n * 7 + j) % len(ITEMS)],
                               "behavior": ["view", "click", "cart", "fav", "buy", "rate"][n % 6],
                               "ts": ts, "value": 4.0, "event_id": f"e{n}"})
    return events


@pytest.mark.parametrize("kind", ["bpr", "sequence"])
def test_job_turns_events_into_one_list_per_user_and_window_and_dead_letters_bad_input(topics_cfg, kind):
    from freshet.ops.runner import run_job
    cfg = topics_cfg.replace(model={"kind": kind})
    events = good_events()
    duplicate = events[5]
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    for j, e in enumerate(events):
        prod.produce(cfg.kafka.input_topic, key=e["user_id"], value=json.dumps(e), timestamp=e["ts"], on_delivery=report)
        if j == 20:  # bad records in the middle of the stream, and a replayed event id
            for raw in MALFORMED:
                prod.produce(cfg.kafka.input_topic, key=b"bad", value=raw, on_delivery=report)
            prod.produce(cfg.kafka.input_topic, key=duplicate["user_id"], value=json.dumps(duplicate),
                         on_delivery=report)
    kafka_io.flush_or_fail(prod, report)

    run_job(cfg, bounded=True)

    recs = list(kafka_io.read_topic(cfg, cfg.kafka.output_topic))
    dead = [json.loads(m.value) for m in kafka_io.read_topic(cfg, cfg.kafka.dlq_topic)]

    # Dead letters: each malformed record once, with its reason and where it came from; the duplicate too.
    codes = sorted(d["reason"].split(":")[0] for d in dead)
    assert codes == sorted(list(MALFORMED.values()) + ["duplicate"])
    for d in dead:
        assert set(d) == {"reason", "raw", "topic", "partition", "offset"}
        assert d["topic"] == cfg.kafka.input_topic and d["offset"] >= 0
        assert len(d["reason"]) > len(d["reason"].split(":")[0]) + 2
    assert any(d["raw"] == "this is not json" for d in dead)

    # Exactly one list per (user, window) in which the user had accepted events.
    expected = {(e["user_id"], e["ts"] - e["ts"] % WINDOW + WINDOW) for e in events}
    got = [json.loads(m.value) for m in recs]
    assert_one_list_per_user_window([(r["user_id"], r["window_end"]) for r in got], expected)

    # Every contract field and invariant.
    versions = defaultdict(list)
    for m, r in zip(recs, got):
        assert m.key.decode() == r["user_id"]
        assert set(r) == {"user_id", "items", "scores", "window_end", "model_version", "emitted_at"}
        assert len(r["items"]) == cfg.model.k == len(set(r["items"])) == len(r["scores"])
        assert all(a >= b for a, b in zip(r["scores"], r["scores"][1:]))
        seen = {e["item_id"] for e in events if e["user_id"] == r["user_id"] and e["ts"] < r["window_end"]}
        assert not seen & set(r["items"]), "items the user already interacted with must be excluded"
        assert isinstance(r["model_version"], int) and r["model_version"] >= 1
        assert isinstance(r["emitted_at"], int) and r["emitted_at"] > 1_600_000_000_000
        versions[r["user_id"]].append((r["window_end"], r["model_version"]))
    for user, vs in versions.items():
        vs.sort()
        assert all(a[1] < b[1] for a, b in zip(vs, vs[1:])), f"model_version must grow across {user}'s windows"

    # Live metrics: the record written at the end of input has scored every accepted event.
    metrics = kafka_io.read_json(cfg, cfg.kafka.metrics_topic)
    assert metrics, "no live-metrics records"
    final = max(metrics, key=lambda m: m["emitted_at"])      # the topic has no key: read order is not write order
    assert sum(m["watermark"] is None for m in metrics) == 1, "one end-of-input record, not one per timer"
    assert final["watermark"] is None and final["live_events"] == len(events)
    assert 0 <= final["live_hit_rate"] <= 1 and final["recommendations_emitted"] == len(got)


def test_the_job_crosses_into_python_only_where_it_must(cfg):
    """Python runs in two places only: the validator for non-canonical records and the model operator.
    (PyFlink's ``key_by`` with a key selector would add a third, a Python operator that wraps every row
    with its key; the job keys its rows in the JVM instead.)"""
    from pyflink.datastream import StreamExecutionEnvironment

    from freshet.jobs import recommender_job
    env = StreamExecutionEnvironment.get_execution_environment(recommender_job.flink_configuration(cfg))
    recommender_job.build_pipeline(env, cfg, bounded=True)
    names = [node["contents"] for node in json.loads(env.get_execution_plan())["nodes"]]
    assert "recommend-online" in names
    python = [n for n in names if "python" in n.lower() or "key_by" in n]
    assert len(python) == 1 and "PythonCorrelate(invocation=[parse_event(" in python[0], python


@pytest.mark.parametrize("call_interval_ms", [0, 600_000])
def test_at_parallelism_two_replicas_learn_as_one_model_and_every_user_window_gets_one_list(topics_cfg,
                                                                                            call_interval_ms):
    """flink.parallelism 2: users split into two model shards, one per subtask, whose replicas of the model
    exchange their changes through the sync topic (each reads it and applies the other's); the bounded run ends
    by itself (the sync is no Flink input); one list per active (user, window), none twice; one
    end-of-input metrics record per shard, together scoring every event. With flink.model_call_interval_ms of
    10 minutes, windows closed after a shard's first call wait for the end of input, which must call them."""
    from freshet.ops.runner import run_job
    cfg = topics_cfg.replace(model={"kind": "bpr"}, flink={"parallelism": 2, "replica_sync": True,
                                                           "model_call_interval_ms": call_interval_ms})
    events = good_events()
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    for e in events:
        prod.produce(cfg.kafka.input_topic, key=e["user_id"], value=json.dumps(e), timestamp=e["ts"], on_delivery=report)
    kafka_io.flush_or_fail(prod, report)

    run_job(cfg, bounded=True)

    got = [json.loads(m.value) for m in kafka_io.read_topic(cfg, cfg.kafka.output_topic)]
    assert_one_list_per_user_window([(r["user_id"], r["window_end"]) for r in got],
                                    {(e["user_id"], e["ts"] - e["ts"] % WINDOW + WINDOW) for e in events})

    final = [m for m in kafka_io.read_json(cfg, cfg.kafka.metrics_topic) if m["watermark"] is None]
    assert len({m["shard"] for m in final}) == len(final) == 2, "one end-of-input record per shard"
    assert all(m["shards_on_subtask"] == 1 for m in final), "the two shard keys must land on distinct subtasks"
    assert sum(m["live_events"] for m in final) == len(events)
    assert sum(m["recommendations_emitted"] for m in final) == len(got)
    assert sum(m["users"] for m in final) == len(USERS), "each user in exactly one shard's model"
    sent = {m["shard"]: m["sync_sent"] for m in final}
    for m in final:      # each replica sent after its calls; it applies only the other's, each delta once (whether
        other = ({0, 2} - {m["shard"]}).pop()          # one arrives before the last call is a race on 3 windows)
        assert m["sync_sent"] >= 1 and m["sync_bytes_sent"] > 0 and m["attempt"] == m["sync_base"] == 0, m
        assert m["sync_applied"] == sum(m["sync_applied_of"].values()) <= sent[other], m
        assert set(m["sync_applied_of"]) <= {str(other)}, m
    assert sum(m["items"] for m in final) > len({e["item_id"] for e in events}), "items shared by both replicas"


def test_shard_keys_put_one_shard_on_each_subtask_and_do_not_move():
    """The shard keys come from Flink's own key-group assignment: one key per subtask, none shared. They are
    part of every savepoint's keyed state, so a Flink upgrade that moved them would strand saved models; the
    values pinned here catch that (and p = 1 keeps key 0, as before keys were chosen)."""
    from pyflink.java_gateway import get_gateway

    from freshet.jobs.recommender_job import shard_keys
    assign = get_gateway().jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment.assignKeyToParallelOperator
    for p in (1, 2, 3, 4, 8):
        keys = shard_keys(p, 128)
        rows = []
        for k in keys:
            row = get_gateway().jvm.org.apache.flink.types.Row(1)
            row.setField(0, k)
            rows.append(row)
        assert [assign(row, 128, p) for row in rows] == list(range(p))
    assert shard_keys(1, 128) == [0] and shard_keys(2, 128) == [0, 2] and shard_keys(4, 128) == [4, 0, 8, 2]


def test_the_watermark_interval_setting_reaches_flink(cfg):
    """``flink.watermark_interval_ms`` is Flink's ``pipeline.auto-watermark-interval`` (its default, 200 ms, unless set)."""
    from freshet.jobs import recommender_job
    assert recommender_job.flink_configuration(cfg).get_string("pipeline.auto-watermark-interval", "") == "200 ms"
    slower = cfg.replace(flink={"watermark_interval_ms": 1000})
    assert recommender_job.flink_configuration(slower).get_string("pipeline.auto-watermark-interval", "") == "1000 ms"
