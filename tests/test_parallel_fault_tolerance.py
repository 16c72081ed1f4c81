"""A TaskManager killed with ``kill -9`` at parallelism 2, on a real two-TaskManager standalone cluster and a
real Kafka broker (#16 item 4).

Two TaskManagers of one slot each, so each model replica runs in its own process; the replicas learn as
one model (``flink.replica_sync``). One uninterrupted run is the reference; then the same ML-100K replay
while one TaskManager is killed and ``freshet cluster start`` replaces it. No duplicate (user_id,
window_end) for a read_committed reader, exactly one list per active user and window, no dead letter,
HR@10 within 2 % (relative) of the uninterrupted run, and the replicas restored (not rebuilt) and syncing
again after the restore.
"""
from __future__ import annotations

import os
import time

import pytest

from freshet.ops import kafka_io, processes, replay
from freshet.ops.flink_cluster import LocalFlinkCluster

from .test_fault_tolerance import check_recovered_run, run_cfg, score, submit, submit_for_fault

pytestmark = pytest.mark.integration
PARALLEL_REST_PORT = 18095


@pytest.fixture(scope="module")
def setup(kafka, kafka_cfg, tmp_path_factory):
    """The ML-100K log in a fresh input topic, a two-TaskManager cluster, and the uninterrupted p = 2 run."""
    from freshet.ops import vendor
    log_df = replay.load_log(vendor.ensure_dataset(kafka_cfg.local.home_path(), "ml-100k"), "movielens")
    tag = f"pfault-{int(time.time())}"
    cfg = kafka_cfg.replace(kafka={"input_topic": f"{tag}-events"},
                            local={"flink_rest_port": PARALLEL_REST_PORT, "taskmanagers": 2, "taskmanager_slots": 1},
                            model={"kind": "sequence"},   # a replay long enough (~60 s) to fail mid-way
                            flink={"parallelism": 2, "replica_sync": True, "checkpoint_interval_ms": 1000,
                                   "model_snapshot_interval_ms": 5000, "restart_delay_ms": 2000,
                                   "restart_attempts": 30})
    kafka_io.ensure_topics(run_cfg(cfg, "setup"))
    replay.replay(cfg, log_df, progress=False)
    cluster = LocalFlinkCluster(cfg)
    cluster.stop(log=lambda *_: None)
    cluster.start()
    try:
        assert len(cluster.pids().get("taskexecutor", [])) == 2
        tmp = tmp_path_factory.mktemp("pfault")
        reference = run_cfg(cfg, "reference")
        job = submit(cluster, reference, tmp)
        assert cluster.wait(job, timeout=600) == "FINISHED"
        yield cfg, cluster, tmp, score(reference, log_df), log_df
    finally:
        cluster.stop()
        assert not any(cluster.pids().values()), "cluster processes must be gone after stop"


def final_metrics(result) -> list[dict]:
    return [m for m in result["metrics"] if m["watermark"] is None]


def test_kill_9_of_one_taskmanager_at_parallelism_2_loses_and_duplicates_nothing(setup):
    cfg, cluster, tmp, reference, log_df = setup
    ends = final_metrics(reference)
    assert len(ends) == 2 and all(m["shards_on_subtask"] == 1 and m["sync_applied"] > 0 for m in ends), ends
    run, job = submit_for_fault(cluster, cfg, "kill9", tmp)
    victim = cluster.pids()["taskexecutor"][0]
    killed_at = time.time()
    os.kill(victim, 9)
    processes.wait_gone([victim], 30)
    cluster.start()        # what a user types: brings the cluster back to local.taskmanagers
    assert len(cluster.pids().get("taskexecutor", [])) == 2
    assert cluster.wait(job, timeout=600) == "FINISHED"
    restored = cluster.checkpoints(job).get("latest", {}).get("restored") or {}
    assert restored, "the job must have restored from a checkpoint"
    result = score(run, log_df)
    ends = final_metrics(result)
    print(f"\nkill -9 of one of two TaskManagers at p = 2: restored checkpoint {restored['id']} "
          f"{restored['restore_timestamp'] / 1000 - killed_at:.1f}s after the kill; HR@10 {result['hr']:.4f} vs "
          f"uninterrupted {reference['hr']:.4f}; lists {len(result['recs'])}; deltas applied after the restore "
          f"{[m['sync_applied'] for m in ends]}")
    check_recovered_run(result, reference, log_df, cfg.window.size_ms)
    assert len(ends) == 2, "one end-of-input record per shard"
    assert all(m["restored_model_version"] > 0 for m in ends), "both replicas must have been restored"
    assert all(m["sync_applied"] > 0 for m in ends), "the replicas must sync again after the restore"
