"""freshet bench: the figures it derives, and one small run of its systems through the real pipeline."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from freshet.ops import bench


class FakeMonitor:
    cpu_seconds = 12.5
    peak_rss = 3 * 2 ** 30


def test_measure_spans_first_close_to_last_write_and_takes_latency_per_list():
    closed = np.array([1_000, 2_000, 3_000, 9_000])
    written = np.array([1_010, 2_500, 3_100, 11_000])
    r = bench.measure(10_000, [{}] * 4, closed, written, dead_letters=0, launched_ms=0, monitor=FakeMonitor(),
                      wall_s=20.0)
    assert r["processing_s"] == 10.0 and r["events_per_s"] == 1000.0 and r["lists_per_s"] == 0.4
    assert r["startup_s"] == 1.0 and r["peak_rss_mib"] == 3072.0 and r["cpu_s"] == 12.5
    assert r["latency_ms"]["samples"] == 4 and r["latency_ms"]["p50"] == pytest.approx(300.0)
    paced = bench.measure(10_000, [{}] * 4, closed, written, 0, 0, FakeMonitor(), 20.0, since_ms=2_500)
    assert paced["latency_ms"]["samples"] == 2 and paced["latency_ms"]["p99"] == pytest.approx(100 + 0.99 * 1900)
    # a warm-up (windows closed before since_ms) shows in the 10 s series but not in the percentiles
    warm = bench.measure(10_000, [{}] * 4, closed, written, 0, 0, FakeMonitor(), 20.0, since_ms=2_500,
                         series_from_ms=1_500)
    assert warm["latency_ms"] == paced["latency_ms"]
    assert [sl["lists"] for sl in warm["latency_over_time"]] == [3]       # 2,000 / 3,000 / 9,000 ms
    assert [sl["lists"] for sl in paced["latency_over_time"]] == [2]


def test_thread_cpu_names_each_thread_and_counts_its_cpu_seconds():
    """The sweep's model-operator CPU is the CPU of TaskManager threads found by name in /proc."""
    import ctypes
    import threading
    import time
    from freshet.ops import processes
    named, done, burnt, group = threading.Event(), threading.Event(), threading.Event(), []

    def busy():
        ctypes.CDLL(None).prctl(15, b"freshet-busy", 0, 0, 0)     # PR_SET_NAME, as the JVM names its threads
        named.set()
        started = time.thread_time()
        while time.thread_time() - started < 0.3:
            pass
        child = threading.Thread(target=burn)       # takes its creator's kernel name, as TensorFlow's pools do
        child.start()
        burnt.wait(10)
        group.append(processes.own_thread_group_cpu())
        done.wait(10)
        child.join()

    def burn():
        started = time.thread_time()
        while time.thread_time() - started < 0.2:
            pass
        burnt.set()
        done.wait(10)       # a live thread: an ended one's CPU leaves /proc with it

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        assert named.wait(10) and burnt.wait(10)
        time.sleep(0.2)
        threads = bench.thread_cpu(os.getpid())
        assert [cpu for name, cpu in threads.values() if name == "freshet-busy"][0] >= 0.25
        monitor = bench.ProcessTreeMonitor(os.getpid(), threads=True)
        monitor.sample()
        assert sum(monitor.threads_named("freshet-b", "nothing")) >= 0.45 and sum(monitor.threads_named("nothing")) == 0
        assert group[0] >= 0.45, "the operator's own account: its thread and the ones it started"
        assert group[0] <= sum(monitor.threads_named("freshet-b")) + 0.05, "only its group's: not this (main) thread's"
        assert len(monitor.threads_named("freshet-b")) == 2 and len(monitor.threads_named("nothing")) == 0
    finally:
        done.set()
        worker.join()


def test_scaled_log_keeps_events_and_items_and_multiplies_users():
    import pandas as pd
    df = pd.DataFrame({"user_id": ["a"] * 30 + ["b"] * 3, "item_id": [str(j) for j in range(33)],
                       "behavior": "view", "ts": range(33)})
    scaled = bench.scale_users(df, 10)
    assert len(scaled) == len(df) and (scaled["item_id"] == df["item_id"]).all()
    assert scaled["user_id"].nunique() == 13


@pytest.mark.integration
def test_bench_runs_reference_and_echo_and_a_paced_run_on_real_parts(kafka_cfg, kafka, tmp_path):
    tag_cfg = kafka_cfg.replace(flink={"checkpoint_interval_ms": 2000})
    report = bench.bench(tag_cfg, "ml-100k", ["reference", "echo"], tmp_path, events=4000, paced_rate=400,
                         paced_seconds=3, paced_systems=["reference"], scales=[], paced_warmup_s=1)
    saved = json.loads((tmp_path / "bench-ml-100k.json").read_text())
    assert saved["systems"].keys() == {"reference", "echo"} and (tmp_path / "bench-ml-100k.md").is_file()
    ref, echo = report["systems"]["reference"], report["systems"]["echo"]
    # the same windows come out of both: one list per active (user, window) of the 4,000 events
    assert ref["lists"] == echo["lists"] > 0 and ref["dead_letters"] == echo["dead_letters"] == 0
    for r in (ref, echo, report["paced"]["reference"]):
        assert r["events_per_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 100
        assert r["latency_ms"]["samples"] > 0 and r["latency_ms"]["p50"] >= 0


@pytest.mark.integration
def test_parallelism_sweep_runs_the_job_at_p_1_and_2_on_one_slot_taskmanagers(kafka_cfg, kafka, tmp_path):
    """#16 item 5 on a slice of ML-100K: each p on its own cluster of p TaskManagers; exactly one list per active
    (user, window) at both (the same lists), each subtask's model-call time and each TaskManager's memory, and
    the replicas' sync at p = 2 only."""
    from freshet.ops import sweep
    cfg = kafka_cfg.replace(model={"kind": "bpr"}, flink={"checkpoint_interval_ms": 2000})
    report = sweep.sweep(cfg, "ml-100k", [1, 2], tmp_path, events=6000)
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert json.loads((tmp_path / "bench-ml-100k-sweep.json").read_text())["runs"].keys() == {"1", "2"}
    assert "| 2 | " in (tmp_path / "bench-ml-100k-sweep.md").read_text()
    assert one["lists"] == two["lists"] > 0 and one["dead_letters"] == two["dead_letters"] == 0
    for p, r in ((1, one), (2, two)):
        assert len(r["model_call_s"]) == len(r["taskmanager_peak_rss_mib"]) == len(r["taskmanager_cpu_s"]) == p
        assert all(s > 0 for s in r["model_call_s"]) and all(m > 100 for m in r["taskmanager_peak_rss_mib"])
        assert 0 < r["HR@10"] < 1 and r["events_per_s"] > 0 and r["projected_events_per_s"] > 0
        assert len(r["model_thread_cpu_s"]) == len(r["sync_client_cpu_s"]) == p
        assert all(0 < m < t for m, t in zip(r["model_thread_cpu_s"], r["taskmanager_cpu_s"])), \
            "the model operator's thread is found in each TaskManager and is part of its CPU"
        assert len(r["model_startup_cpu_s"]) == p and all(s > 1 for s in r["model_startup_cpu_s"]), \
            "each operator reports what its start (TensorFlow's import, the compile) cost its threads"
        assert all(0 < s < m + 1 for s, m in zip(sorted(r["model_cpu_after_startup_s"]), sorted(r["model_thread_cpu_s"])))
        assert 0 < r["model_cpu_ms_per_1k_events_after_startup"] < r["model_cpu_ms_per_1k_events"]
    assert one["sync_bytes_per_s"] == 0 and two["sync_bytes_per_s"] > 0 and two["sync_lag_ms_max"] is not None
    assert one["sync_client_threads"] == [0] and all(n >= 2 for n in two["sync_client_threads"]), \
        "the replicas' sync clients are found by name (librdkafka's threads), and only at p > 1"
