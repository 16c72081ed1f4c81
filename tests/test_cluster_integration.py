"""The job submitted with `flink run` to a real standalone Flink cluster (JobManager + TaskManager)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from freshet.conf.settings import dump_config
from freshet.ops import kafka_io, processes
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


@pytest.fixture
def two_taskmanagers(cfg):
    c = LocalFlinkCluster(cfg.replace(local={"flink_rest_port": TEST_REST_PORT + 10, "taskmanagers": 2,
                                             "taskmanager_slots": 1, "taskmanager_memory_mb": 1536}))
    c.stop(log=lambda *_: None)
    yield c
    c.stop()
    assert not any(c.pids().values()), "cluster processes must be gone after stop"


def test_cluster_start_brings_up_the_configured_taskmanagers_and_replaces_a_lost_one(two_taskmanagers):
    c = two_taskmanagers
    said: list[str] = []
    status = c.start(log=said.append)
    assert len(status.taskmanagers) == 2 and status.slots_total == 2
    assert len(c.pids()["taskexecutor"]) == 2
    assert "2 of 2 TaskManager(s)" in str(status) and str(status).count("TaskManager ") == 2

    c.start(log=said.append)            # idempotent: nothing more starts
    assert said[-1].endswith("(already)")
    assert len(c.pids()["taskexecutor"]) == 2

    lost = c.pids()["taskexecutor"][0]
    os.kill(lost, signal.SIGKILL)
    processes.wait_gone([lost], 5)
    before = {tm.id for tm in c.status().taskmanagers}     # the JobManager still lists the lost one
    status = c.start(log=said.append)
    live = c.pids()["taskexecutor"]
    assert len(live) == 2 and lost not in live
    assert len({tm.id for tm in status.taskmanagers} - before) == 1, "exactly one replacement"
    assert any("started 1 TaskManager(s) (1 were running)" in line for line in said), said


def test_duplicate_event_id_after_a_restore_on_another_partition_is_dead_lettered(cluster, tmp_path, capsys):
    """Duplicates are caught in Flink state keyed by event_id: the memory survives a stop with a savepoint and
    a resume, and does not depend on the partition a copy arrives on."""
    from freshet.ops import savepoints
    from freshet.scripts.cli import main
    cfg = cluster.cfg
    config = dump_config(cfg, tmp_path / "job.yaml")
    events = good_events()
    first, later = events[:len(events) // 2], events[len(events) // 2:]
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    for e in first:
        prod.produce(cfg.kafka.input_topic, value=json.dumps(e), partition=0, timestamp=e["ts"], on_delivery=report)
    kafka_io.flush_or_fail(prod, report)
    job = cluster.submit(config, bounded=False)
    deadline = time.monotonic() + 180
    while not kafka_io.read_json(cfg, cfg.kafka.output_topic):       # the first copies are in the job's state
        assert time.monotonic() < deadline and cluster.job_state(job) == "RUNNING"
        time.sleep(1)
    assert main(["stop", job, "--config", str(config)]) == 0
    location = capsys.readouterr().out.strip().splitlines()[-1]

    duplicate = first[3]                                   # again, on the other partition, after the restore
    prod.produce(cfg.kafka.input_topic, value=json.dumps(duplicate), partition=1, timestamp=later[0]["ts"],
                 on_delivery=report)
    for e in later:
        prod.produce(cfg.kafka.input_topic, value=json.dumps(e), partition=e["ts"] % 2, timestamp=e["ts"],
                     on_delivery=report)
    kafka_io.flush_or_fail(prod, report)
    resumed = cluster.submit(config, bounded=False, from_savepoint=location)    # unbounded, as it was saved
    deadline = time.monotonic() + 180
    while not kafka_io.read_json(cfg, cfg.kafka.dlq_topic):
        assert time.monotonic() < deadline and cluster.job_state(resumed) == "RUNNING"
        time.sleep(1)
    assert main(["stop", resumed, "--drain", "--config", str(config)]) == 0     # the last windows close
    assert savepoints.local_path(location).is_dir()
    dead = kafka_io.read_json(cfg, cfg.kafka.dlq_topic)
    assert [(d["reason"].split(":")[0], d["partition"], json.loads(d["raw"])["event_id"]) for d in dead] == \
        [("duplicate", 1, duplicate["event_id"])]
    recs = kafka_io.read_json(cfg, cfg.kafka.output_topic)
    keys = [(r["user_id"], r["window_end"]) for r in recs]
    assert sorted(keys) == sorted({(e["user_id"], e["ts"] - e["ts"] % WINDOW + WINDOW) for e in events})
