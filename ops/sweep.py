"""``freshet bench --parallelism 1,2,4``: the job at each parallelism on a standalone cluster, side by side.

For each p, a standalone cluster of p TaskManagers of one slot each (so each model subtask runs in a process
of its own, as on p machines), the same preloaded log, one bounded run of the job, measured from outside
and from its own output and metrics:

* HR@10 by the evaluator (CONTRACTS §3) over the lists it wrote; events/s as in ``freshet bench``;
* CPU seconds of every TaskManager and the JobManager (psutil) from the submit on (their own start-up before it
  is left out; the job's start-up, TensorFlow's import and the XLA compile in each TaskManager, is in), per
  1,000 events for the whole job;
* model-call seconds per subtask (``model_call_seconds`` of each shard's end-of-input metrics record: the *wall*
  time inside model calls, applies and sends included) and their sum per 1,000 events;
* the model operator's CPU seconds per subtask: its task thread's (``recommend-online``, and what Flink chains to
  it: the conversion to the sinks' rows, their filters and Kafka writers; the threads TensorFlow starts from it
  carry its name) plus its Kafka clients' threads (librdkafka's ``rdk:``: the sync topic's producer and reader),
  from ``/proc/<pid>/task/*/stat`` of each TaskManager; summed per 1,000 events: the model operator's cost, sync
  included, which the wall time of its calls overstates on a machine with fewer cores than busy threads;
* the sync at p > 1: bytes sent per second of processing, the send -> apply lag (mean of the replicas' means,
  and the largest), time spent waiting for the others;
* peak RSS of each TaskManager.

What it projects for a machine with a core per subtask: a TaskManager's CPU seconds are the least wall time
it needs, so the busiest one bounds the run from below (``projected_events_per_s``: an upper bound on
throughput; the JobManager and the broker are taken to have cores of their own).
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from freshet.conf.settings import Config, dump_config
from freshet.ops import kafka_io, replay
from freshet.ops.bench import (LOG_APPEND_TIME, SYSTEMS, ProcessTreeMonitor, header, measure, prepare, read_output,
                                system_config, write_report)
from freshet.ops.flink_cluster import ENDED, LocalFlinkCluster

SWEEP_REST_PORT = 18071     # the sweep's own clusters: never the user's (local.flink_rest_port)
MODEL_THREAD = "recommend-onli"   # the model operator's task thread, as the kernel names it (15 characters at most)
SYNC_CLIENT_THREADS = "rdk:"      # librdkafka's threads: the operator's Kafka clients (the sync topic's)


def run_at(cfg: Config, p: int, df: pd.DataFrame, workdir: Path, log=print, timeout_s: float = 7200) -> dict:
    """One bounded run of the job at parallelism ``p`` on a fresh cluster of ``p`` one-slot TaskManagers."""
    from freshet.models.evaluation import evaluate
    cluster = LocalFlinkCluster(cfg)
    cluster.stop(log=lambda *_: None)
    cluster.start(log=lambda *_: None)
    try:
        taskmanagers = sorted(cluster.pids().get("taskexecutor", []))
        assert len(taskmanagers) == p, f"{len(taskmanagers)} TaskManager processes, expected {p}"
        monitors = {pid: ProcessTreeMonitor(pid, threads=pid in taskmanagers)
                    for pid in taskmanagers + cluster.pids().get("standalonesession", [])}
        for m in monitors.values():
            m.sample()                # the processes' own start-up, before the job: not the job's cost
        baseline = {pid: m.cpu_seconds for pid, m in monitors.items()}
        for m in monitors.values():
            m.start()
        kafka_io.ensure_topics(cfg, topic_config={cfg.kafka.output_topic: LOG_APPEND_TIME})
        config = dump_config(cfg, workdir / f"p{p}.yaml")
        launched_ms, started = int(time.time() * 1000), time.monotonic()
        job = cluster.submit(config, bounded=True)
        last = started
        while (state := cluster.job_state(job)) not in ENDED:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"p = {p}: job {job} not done after {timeout_s:.0f}s")
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                log(f"  [{last - started:5.0f}s] p = {p} running; output topic at "
                    f"{sum(kafka_io.end_offsets(cfg, cfg.kafka.output_topic).values()):,} records")
            time.sleep(1)
        wall = time.monotonic() - started
        for m in monitors.values():
            m.stop()
        if state != "FINISHED":
            raise RuntimeError(f"p = {p}: job {job} ended {state}; see {cluster.dir / 'logs'}")
        if not any(monitors[pid].threads_named(MODEL_THREAD) for pid in taskmanagers):
            raise RuntimeError(f"p = {p}: no TaskManager thread named {MODEL_THREAD}*: the model operator's CPU "
                               "cannot be measured (was its task renamed?)")
    finally:
        cluster.stop(log=lambda *_: None)
    used = {pid: m.cpu_seconds - baseline[pid] for pid, m in monitors.items()}
    tm_cpu = [round(used[pid], 1) for pid in taskmanagers]
    tm_rss = [round(monitors[pid].peak_rss / 2 ** 20, 1) for pid in taskmanagers]
    cpu = sum(used.values())
    lists, closed, written, dead = read_output(cfg)
    out = measure(len(df), lists, closed, written, dead, launched_ms,
                  SimpleNamespace(cpu_seconds=cpu, peak_rss=max(m.peak_rss for m in monitors.values())), wall)
    metrics = kafka_io.read_json(cfg, cfg.kafka.metrics_topic)
    ends = sorted((m for m in metrics if m.get("watermark") is None), key=lambda m: m["shard"])
    if len(ends) != p:
        raise RuntimeError(f"p = {p}: {len(ends)} end-of-input metrics records, expected one per subtask")
    lags = [m for m in metrics if m.get("sync_lag_ms_mean") is not None]
    model_s = [m["model_call_seconds"] for m in ends]
    model_cpu = [round(sum(monitors[pid].threads_named(MODEL_THREAD)), 1) for pid in taskmanagers]
    sync_threads = [monitors[pid].threads_named(SYNC_CLIENT_THREADS) for pid in taskmanagers]
    sync_cpu = [round(sum(cpus), 2) for cpus in sync_threads]
    # The operator's own account of its threads' CPU (per shard, one a subtask): what being ready cost it (TensorFlow's
    # import, the model's compile: fixed per subtask) and what it used after, on the events.
    startup = [m.get("startup_cpu_s") for m in ends]
    steady = [None if m.get("cpu_s") is None or m.get("startup_cpu_s") is None
              else round(m["cpu_s"] - m["startup_cpu_s"], 1) for m in ends]
    stream = zip(df["user_id"], df["item_id"], df["ts"])
    out.update({
        "parallelism": p, "job": job,
        "HR@10": round(evaluate(stream, lists, ks=(10,)).overall["HR@10"], 4),
        "cpu_ms_per_1k_events": round(cpu / len(df) * 1e6, 1),
        "taskmanager_cpu_s": tm_cpu, "taskmanager_peak_rss_mib": tm_rss,
        "model_call_s": model_s, "model_calls": [m["model_calls"] for m in ends],
        "model_ms_per_1k_events": round(sum(model_s) / len(df) * 1e6, 1),
        "model_thread_cpu_s": model_cpu, "sync_client_cpu_s": sync_cpu,
        "sync_client_threads": [len(cpus) for cpus in sync_threads],
        "model_cpu_ms_per_1k_events": round((sum(model_cpu) + sum(sync_cpu)) / len(df) * 1e6, 1),
        "model_startup_cpu_s": startup, "model_cpu_after_startup_s": steady,
        "model_cpu_ms_per_1k_events_after_startup": round((sum(steady) + sum(sync_cpu)) / len(df) * 1e6, 1)
        if None not in steady else None,
        "sync_bytes_per_s": round(sum(m.get("sync_bytes_sent", 0) for m in ends) / out["processing_s"], 1)
        if out["processing_s"] else None,
        "sync_lag_ms_mean": round(sum(m["sync_lag_ms_mean"] for m in lags) / len(lags), 1) if lags else None,
        "sync_lag_ms_max": max((m["sync_lag_ms_max"] for m in lags), default=None),
        "sync_wait_s": [m.get("sync_wait_s") for m in ends] if p > 1 else None,
        "sync_apply_cpu_s": [m.get("sync_apply_cpu_s") for m in ends] if p > 1 else None,
        "sync_send_cpu_s": [m.get("sync_send_cpu_s") for m in ends] if p > 1 else None,
        "projected_events_per_s": round(len(df) / max(tm_cpu), 1) if max(tm_cpu) else None,
    })
    return out


def sweep(cfg: Config, dataset: str, parallelisms: list[int], out_dir: Path, events: int | None = None,
          log=print) -> dict:
    """The job at each of ``parallelisms`` on the same replayed log; writes bench-<dataset>-sweep.json/.md."""
    if not parallelisms or any(p < 1 for p in parallelisms):
        raise ValueError(f"parallelisms must be >= 1, got {parallelisms}")
    started = time.monotonic()
    df, tag, workdir = prepare(cfg, dataset, events, "sweep", log)
    input_cfg = cfg.replace(kafka={"input_topic": f"{tag}-events"})
    created = [input_cfg.kafka.input_topic]
    report = {**header(dataset, df),
              "config": {"model": cfg.model.kind, "replica_sync": cfg.flink.replica_sync,
                         "replica_sync_wait_ms": cfg.flink.replica_sync_wait_ms,
                         "checkpoint_interval_ms": cfg.flink.checkpoint_interval_ms,
                         "watermark_interval_ms": cfg.flink.watermark_interval_ms,
                         "model_call_interval_ms": cfg.flink.model_call_interval_ms,
                         "replica_sync_min_change": cfg.flink.replica_sync_min_change,
                         "python_execution_mode": cfg.flink.execution_mode, "window_ms": cfg.window.size_ms},
              "runs": {}}
    try:
        kafka_io.ensure_topics(input_cfg)
        log(str(replay.replay(input_cfg, df)))
        for p in parallelisms:
            log(f"\n== p = {p}: {p} TaskManager(s) of one slot, model {cfg.model.kind}")
            pcfg = system_config(input_cfg, f"{tag}-p{p}", SYSTEMS["full"]).replace(
                flink={"parallelism": p},
                local={"taskmanagers": p, "taskmanager_slots": 1, "flink_rest_port": SWEEP_REST_PORT})
            created.extend(pcfg.kafka.topics())
            result = report["runs"][str(p)] = run_at(pcfg, p, df, workdir, log)
            log(summary_line(result))
    finally:
        kafka_io.delete_topics(cfg, sorted(set(created)))
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    write_report(report, out_dir, log, name=f"bench-{dataset}-sweep", render=markdown)
    return report


def summary_line(r: dict) -> str:
    return (f"p = {r['parallelism']}: HR@10 {r['HR@10']}, {r['events_per_s']:,.0f} events/s, CPU {r['cpu_s']}s "
            f"({r['cpu_ms_per_1k_events']} ms per 1k events), model calls {r['model_call_s']} s, model operator CPU "
            f"{r['model_thread_cpu_s']} s + sync clients {r['sync_client_cpu_s']} s "
            f"({r['model_cpu_ms_per_1k_events']} ms per 1k events), TaskManager peak "
            f"RSS {r['taskmanager_peak_rss_mib']} MiB, sync {r['sync_bytes_per_s'] or 0:,.0f} B/s")


def ratio(run: dict, one: dict, key: str) -> str:
    """``run[key]`` against p = 1's, as "1.23×" ("–" where either lacks it: a report of an older sweep)."""
    return f"{run[key] / one[key]:.2f}×" if run.get(key) and one.get(key) else "–"


def busiest(run: dict, one: dict, key: str) -> str:
    """The largest of ``run[key]`` (one value a subtask) against p = 1's, as "0.55×" ("–" where either lacks it)."""
    here, base = ([v for v in r.get(key) or [] if v is not None] for r in (run, one))
    return f"{max(here) / max(base):.2f}×" if here and base and max(base) else "–"


def markdown(report: dict) -> str:
    """The sweep's table, each p against p = 1 where it ran.

    >>> r = {"parallelism": 1, "HR@10": 0.1, "events_per_s": 1000.0, "cpu_ms_per_1k_events": 900.0,
    ...      "model_ms_per_1k_events": 400.0, "model_call_s": [40.0], "taskmanager_peak_rss_mib": [1500.0],
    ...      "model_thread_cpu_s": [38.5], "sync_client_cpu_s": [0.0], "model_cpu_ms_per_1k_events": 385.0,
    ...      "sync_bytes_per_s": 0.0, "sync_lag_ms_mean": None, "sync_lag_ms_max": None, "projected_events_per_s": 1100.0,
    ...      "lists": 10, "processing_s": 100.0}
    >>> rep = {"dataset": "d", "events": 100000, "users": 1, "items": 1, "config": {"model": "bpr"}, "runs": {"1": r},
    ...        "machine": {"cpus": 2, "cpu_model": "x", "memory_gib": 24}}
    >>> "| 1 | 0.1000 (1.00×) | 1,000 | 900 | 385 | – | 38.5 (0.0) | 40.0 |" in markdown(rep)
    True
    >>> r.update(model_cpu_ms_per_1k_events_after_startup=305.0, model_startup_cpu_s=[8.0])
    >>> "| 385 | 305 (8.0) | 38.5 (0.0) |" in markdown(rep)
    True
    >>> rep["runs"]["2"] = {**r, "parallelism": 2, "sync_apply_cpu_s": [3.0, 2.5], "sync_send_cpu_s": [1.0, 1.5]}
    >>> [line[-61:] for line in markdown(rep).splitlines() if line.startswith("The sync's CPU")]
    ['p = 2: 3.0 + 1.0 s, 2.5 + 1.5 s (80 ms per 1k events, summed)']
    """
    m, c, runs = report["machine"], report["config"], report["runs"]
    one = runs.get("1")
    lines = [f"Parallelism sweep, dataset **{report['dataset']}** ({report['events']:,} events), model "
             f"{c['model']}, a standalone cluster of p TaskManagers of one slot each; watermark every "
             f"{c.get('watermark_interval_ms', 200)} ms, model calls at most every {c.get('model_call_interval_ms', 0)} ms "
             f"(0: per watermark), shared rows sent once a value moved more than "
             f"{c.get('replica_sync_min_change', 0.0):g} (`flink.replica_sync_min_change`; 0: every change). "
             f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB.", "",
             "| p | HR@10 (vs p = 1) | events/s | CPU ms / 1k events (job) | model-operator CPU ms / 1k events "
             "(summed) | ... after start-up (start-up CPU s per subtask) | model-operator CPU s per subtask (sync clients) | "
             "model-call wall s per subtask | "
             "peak RSS MiB per TaskManager | sync B/s | sync lag mean / max ms | projected events/s, a core per "
             "subtask |", "|" + "---|" * 12]
    for p, r in runs.items():
        rel = f" ({r['HR@10'] / one['HR@10']:.2f}×)" if one and one["HR@10"] else ""
        lag = ("–" if r["sync_lag_ms_mean"] is None else f"{r['sync_lag_ms_mean']:,.0f} / {r['sync_lag_ms_max']:,.0f}")
        operator = ", ".join(f"{m:.1f} ({c:.1f})" for m, c in zip(r.get("model_thread_cpu_s", []),
                                                                    r.get("sync_client_cpu_s", [])))
        startup = ", ".join(f"{s:.1f}" for s in r.get("model_startup_cpu_s") or [] if s is not None)
        after = (f"{r['model_cpu_ms_per_1k_events_after_startup']:,.0f} ({startup})"
                 if r.get("model_cpu_ms_per_1k_events_after_startup") else "–")
        lines.append(f"| {p} | {r['HR@10']:.4f}{rel} | {r['events_per_s']:,.0f} | {r['cpu_ms_per_1k_events']:,.0f} | "
                     f"{r.get('model_cpu_ms_per_1k_events', 0):,.0f} | {after} | {operator or '–'} | "
                     f"{', '.join(f'{s:.1f}' for s in r['model_call_s'])} | "
                     f"{', '.join(f'{s:,.0f}' for s in r['taskmanager_peak_rss_mib'])} | "
                     f"{r['sync_bytes_per_s'] or 0:,.0f} | {lag} | {r['projected_events_per_s'] or 0:,.0f} |")
    if one:
        lines += ["", "Against p = 1: " + "; ".join(
            f"p = {p}: model-operator CPU per 1k events {ratio(r, one, 'model_cpu_ms_per_1k_events')} "
            f"(after start-up {ratio(r, one, 'model_cpu_ms_per_1k_events_after_startup')}; busiest subtask's "
            f"{busiest(r, one, 'model_cpu_after_startup_s')}), "
            f"model-call wall s per 1k events {ratio(r, one, 'model_ms_per_1k_events')}, "
            f"busiest subtask's model-call s {max(r['model_call_s']) / max(one['model_call_s']):.2f}× (1/p = {1 / int(p):.2f})"
            for p, r in runs.items() if p != "1" and one["model_ms_per_1k_events"] and max(one["model_call_s"]))]
    synced = {p: r for p, r in runs.items() if r.get("sync_apply_cpu_s") and None not in r["sync_apply_cpu_s"]}
    if synced:
        lines += ["", "The sync's CPU per subtask, of the model operator's (its task thread in applying the others' "
                  "deltas, parsing them included, + in exporting and sending its own): " + "; ".join(
                      f"p = {p}: " + ", ".join(f"{a:.1f} + {s:.1f} s" for a, s in zip(r["sync_apply_cpu_s"],
                                                                                   r["sync_send_cpu_s"]))
                      + f" ({sum(r['sync_apply_cpu_s'] + r['sync_send_cpu_s']) / report['events'] * 1e6:,.0f} ms per 1k events, "
                      "summed)" for p, r in synced.items())]
    lines += ["", "Model-operator CPU: its task thread's CPU seconds (the threads it starts included) and, in "
              "brackets, its Kafka clients' (the sync topic's), from /proc; after start-up: less what its threads had "
              "used when it was ready for its first window (TensorFlow's import, the model's build and compile: fixed "
              "per subtask, as each operator reports it on the metrics topic); model-call wall s: the time inside its "
              "calls, which includes waiting for a core when the machine has fewer cores than busy threads.",
              "", "Projected: each TaskManager's CPU seconds as its wall time with a core of its own; the busiest "
              "bounds the run (an upper bound on events/s; the JobManager and broker on other cores)."]
    return "\n".join(lines) + "\n"
