"""The job submitted with `flink run` to a real standalone Flink cluster (JobManager + TaskManager)."""
from __future__ import annotations

import json

import pytest

from freshet.conf.settings import dump_config
from freshet.ops import kafka_io
from freshet.ops.flink_cluster import LocalFlinkCluster
from tests.test_job_integration import WINDOW, good_events

pytestmark = pytest.mark.integration
TEST_REST_PORT = 18081


@pytest.fixture
def cluster(topics_cfg):
    cfg = topics_cfg.replace(local={"flink_rest_port": TEST_REST_PORT})
    c = LocalFlinkCluster(cfg)
    c.stop(log=lambda *_: None)
    c.start()
    yield c
    c.stop()
    assert not any(c.pids().values()), "cluster processes must be gone after stop"


def test_submitted_job_runs_on_the_cluster_and_writes_one_list_per_user_window(cluster, tmp_path):
    cfg = cluster.cfg
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    events = good_events()
    for e in events:
        prod.produce(cfg.kafka.input_topic, key=e["user_id"], value=json.dumps(e), on_delivery=report)
    kafka_io.flush_or_fail(prod, report)

    job_id = cluster.submit(dump_config(cfg, tmp_path / "job.yaml"), bounded=True)
    assert len(job_id) == 32
    assert cluster.wait(job_id, timeout=300) == "FINISHED"

    recs = kafka_io.read_json(cfg, cfg.kafka.output_topic)
    keys = [(r["user_id"], r["window_end"]) for r in recs]
    assert sorted(keys) == sorted({(e["user_id"], e["ts"] - e["ts"] % WINDOW + WINDOW) for e in events})
