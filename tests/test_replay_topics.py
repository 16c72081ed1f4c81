"""`freshet replay --topic T`: a missing topic is created like the job's own, and no broker is one clear
error before anything is sent (never one delivery error per record)."""
from __future__ import annotations

import uuid

import pandas as pd
import pytest
from confluent_kafka.admin import ConfigResource

from freshet.ops import kafka_io
from freshet.ops.replay import replay
from freshet.scripts.cli import main

EVENTS = pd.DataFrame({"user_id": ["u1", "u2", "u1"], "item_id": ["a", "b", "c"], "behavior": ["click"] * 3,
                       "ts": [1_000, 2_000, 3_000]})


@pytest.mark.integration
def test_replay_creates_a_missing_topic_with_the_jobs_partitions_and_retention(kafka, kafka_cfg):
    topic = f"replay-new-{uuid.uuid4().hex[:8]}"
    assert topic not in kafka_io.topic_names(kafka_cfg)
    summary = replay(kafka_cfg, EVENTS, topic=topic, progress=False)
    assert summary.events == 3
    client = kafka_io.admin(kafka_cfg)
    meta = client.list_topics(timeout=10).topics[topic]
    assert len(meta.partitions) == kafka_cfg.kafka.partitions
    configs = list(client.describe_configs([ConfigResource("topic", topic)]).values())[0].result()
    assert configs["retention.ms"].value == "-1"      # historical timestamps are kept
    assert len(list(kafka_io.read_topic(kafka_cfg, topic, read_committed=False))) == 3
    kafka_io.delete_topics(kafka_cfg, [topic])


def test_replay_without_a_broker_fails_once_before_sending(tmp_path, capsys, monkeypatch):
    log = tmp_path / "log.csv"
    EVENTS.to_csv(log, index=False)
    monkeypatch.setenv("FRESHET_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")     # nothing listens there
    assert main(["replay", "--input", str(log), "--format", "events", "--topic", "anything", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Kafka broker answered at 127.0.0.1:9" in err[0] and "freshet kafka start" in err[0]
