"""Shared fixtures. Integration tests run a real Kafka broker (its own ports and state folder, started
here and stopped by process id) and the job on the local Flink runtime; they are never skipped."""
from __future__ import annotations

import shutil
import uuid

import pytest

from freshet.conf.settings import Config, load_config

TEST_KAFKA_PORT = 19092
TEST_ZOOKEEPER_PORT = 12181


@pytest.fixture
def cfg() -> Config:
    return load_config(env={})


@pytest.fixture(scope="session")
def kafka_cfg() -> Config:
    """Config for the test broker on 127.0.0.1:19092 (never the developer's own broker)."""
    return load_config(env={}).replace(
        kafka={"bootstrap_servers": f"127.0.0.1:{TEST_KAFKA_PORT}"},
        local={"kafka_port": TEST_KAFKA_PORT, "zookeeper_port": TEST_ZOOKEEPER_PORT})


@pytest.fixture(scope="session")
def kafka(kafka_cfg):
    """A real Apache Kafka broker for the whole test session, on fresh state, stopped at the end."""
    from freshet.ops.kafka_local import LocalKafka
    broker = LocalKafka(kafka_cfg)
    broker.stop(log=lambda *_: None)
    shutil.rmtree(broker.dir, ignore_errors=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topics_cfg(kafka, kafka_cfg) -> Config:
    """A config whose input, output and dead-letter topics are new and empty."""
    from freshet.ops import kafka_io
    tag = uuid.uuid4().hex[:8]
    cfg = kafka_cfg.replace(kafka={"input_topic": f"events-{tag}", "output_topic": f"recs-{tag}",
                                   "dlq_topic": f"dlq-{tag}", "metrics_topic": f"metrics-{tag}", "sync_topic": f"sync-{tag}",
                                   "group_id": f"freshet-test-{tag}"},
                            flink={"transactional_id_prefix": f"freshet-test-{tag}",
                                   "checkpoint_interval_ms": 2000, "model_snapshot_interval_ms": 500})
    kafka_io.ensure_topics(cfg)
    return cfg
