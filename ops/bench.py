"""``freshet bench``: end-to-end speed on the real pipeline (Kafka -> Flink -> Kafka), next to the engine's ceiling.

One run, one machine, the same data for every system:

* ``reference``: a JVM-only job with the same source, parsing, per-user windows and sink, but no Python
  and no model (``recommender_job --reference``): what Flink itself does here;
* ``echo``: the full job with the model replaced by a no-op scorer: the cost of the Python boundary;
* ``full``: the full job, with the configured model (``model.kind``, the sequence model by default).

The log is replayed once, as fast as possible, into an input topic; each system then runs as its own
bounded job process on that topic, and is measured from the outside and from its own output:

* events/s: events / (last list written - first window closed) — the replay is preloaded, so the first
  window closes as soon as the job reads its first records; start-up is reported apart;
* latency: per list, broker append time of the list (the output topics use ``LogAppendTime``) minus
  the time its window closed in the job (the ``freshet.window_closed_at`` header, set in the JVM when
  the watermark passed the window's end) — p50/p95/p99;
* CPU seconds and peak RSS of the job's whole process tree (the Python client and the Flink JVM with
  its embedded Python workers), sampled with psutil.

``--paced-rate`` replays a fresh topic at a fixed rate while a job runs, for latency under steady load.
``--scale`` reruns the full job on synthetic logs with N x the users (each user's history dealt
round-robin to N pseudo-users; same events, same items), to show how cost per event grows with users.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from freshet.conf.settings import Config, dump_config
from freshet.jobs.tables import CLOSED_AT_HEADER
from freshet.ops import kafka_io, replay, vendor
from freshet.ops.processes import thread_cpu

LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


@dataclass(frozen=True)
class System:
    name: str
    description: str
    overrides: dict
    reference: bool = False


SYSTEMS = {
    "reference": System("reference", "JVM-only: same source, parsing, windows, sink; no Python, no model", {}, True),
    "echo": System("echo", "full job with a no-op scorer: the cost of the Python boundary", {"model": {"kind": "echo"}}),
    "full": System("full", "full Freshet job: the configured model (model.kind) learning in micro-batches", {}),
}


class ProcessTreeMonitor(threading.Thread):
    """Samples a process and all its descendants: peak of the summed RSS, CPU seconds per process; with
    ``threads``, also the CPU seconds of each thread of the root process, by thread name (``threads_named``)."""

    def __init__(self, pid: int, every_s: float = 0.2, threads: bool = False):
        super().__init__(daemon=True)
        import psutil
        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}
        self.threads: dict[int, tuple[str, float]] | None = {} if threads else None
        self._halt = threading.Event()

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except self.psutil.Error:
            return
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
            except self.psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)
        if self.threads is not None:
            for tid, (name, cpu) in thread_cpu(self.root.pid).items():
                self.threads[tid] = (name, max(cpu, self.threads.get(tid, ("", 0.0))[1]))

    def threads_named(self, *prefixes: str) -> list[float]:
        """CPU seconds of each of the root's threads seen so far whose name starts with one of ``prefixes``, up to
        the last sample (a thread that ended loses what it used after the last sample it was seen in)."""
        return [cpu for name, cpu in (self.threads or {}).values() if name.startswith(prefixes)]

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def system_config(base: Config, tag: str, system: System) -> Config:
    sections = {section: dict(values) for section, values in system.overrides.items()}
    sections.setdefault("kafka", {}).update({
        "output_topic": f"{tag}-recs-{system.name}", "dlq_topic": f"{tag}-dlq-{system.name}",
        "metrics_topic": f"{tag}-metrics-{system.name}", "sync_topic": f"{tag}-sync-{system.name}",
        "group_id": f"{tag}-{system.name}"})
    sections.setdefault("flink", {})["transactional_id_prefix"] = f"{tag}-{system.name}"
    return base.replace(**sections)


def start_job(cfg: Config, config_file: Path, bounded: bool, reference: bool) -> subprocess.Popen:
    """The job in its own process (one PyFlink job per process); its output goes to a log file."""
    config_file.parent.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, config_file)
    cmd = [sys.executable, "-m", "freshet.jobs.recommender_job", "--config", str(config_file)]
    cmd += ["--bounded"] if bounded else []
    cmd += ["--reference"] if reference else []
    from freshet.jobs.recommender_job import prepare_local_runtime
    prepare_local_runtime(cfg)   # the worker environment goes to the child through os.environ
    log_file = open(config_file.with_suffix(".log"), "w")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def stop_job(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop an unbounded job: its whole process tree (the Flink JVM can outlive its Python client when
    it hangs in a shutdown hook), SIGTERM first, then SIGKILL for whatever is left."""
    import psutil
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.poll()


def read_output(cfg: Config) -> tuple[list[dict], np.ndarray, np.ndarray, int]:
    """The lists a job wrote, each one's window-close time (header) and broker append time (ms), and
    how many dead letters it wrote."""
    values, closed, written = [], [], []
    for msg in kafka_io.read_topic(cfg, cfg.kafka.output_topic):
        values.append(json.loads(msg.value))
        headers = dict(msg.headers)
        closed.append(int(headers[CLOSED_AT_HEADER]) if CLOSED_AT_HEADER in headers else -1)
        written.append(msg.timestamp)
    dead = sum(1 for _ in kafka_io.read_topic(cfg, cfg.kafka.dlq_topic))
    return values, np.asarray(closed, np.int64), np.asarray(written, np.int64), dead


def latency_over_time(closed: np.ndarray, latency: np.ndarray, slice_s: float = 10.0) -> list[dict]:
    """Latency per ``slice_s`` of window-close time (from the first close): where a run was slow, e.g.
    JIT warm-up, a model recompile after a table growth, or a backlog that builds up and drains.

    >>> latency_over_time(np.array([0, 1000, 12000]), np.array([50, 70, 900]))
    [{'from_s': 0, 'lists': 2, 'p50_ms': 60.0, 'p99_ms': 69.8}, {'from_s': 10, 'lists': 1, 'p50_ms': 900.0, 'p99_ms': 900.0}]
    """
    if not len(closed):
        return []
    slot = ((closed - closed.min()) // int(slice_s * 1000)).astype(np.int64)
    return [{"from_s": int(s * slice_s), "lists": int((slot == s).sum()),
             "p50_ms": round(float(np.percentile(latency[slot == s], 50)), 1),
             "p99_ms": round(float(np.percentile(latency[slot == s], 99)), 1)} for s in np.unique(slot)]


def measure(events: int, lists: list[dict], closed: np.ndarray, written: np.ndarray, dead_letters: int,
            launched_ms: int, monitor: ProcessTreeMonitor, wall_s: float, since_ms: int | None = None,
            series_from_ms: int | None = None) -> dict:
    """The figures of one run; latency percentiles only over windows closed at or after ``since_ms``, the
    latency series over windows closed at or after ``series_from_ms`` (paced mode: the warm-up shows in
    the series, not in the percentiles)."""
    since_ms = since_ms or 0
    shown = closed >= (series_from_ms if series_from_ms is not None else since_ms)
    every = written - closed
    latency = every[closed >= since_ms]
    span_s = (written.max() - closed.min()) / 1000 if len(lists) else float("nan")
    return {"events": events, "lists": len(lists), "dead_letters": dead_letters,
            "latency_over_time": latency_over_time(closed[shown], every[shown]),
            "startup_s": round((closed.min() - launched_ms) / 1000, 1) if len(lists) else None,
            "processing_s": round(span_s, 2), "events_per_s": round(events / span_s, 1) if len(lists) else 0.0,
            "lists_per_s": round(len(lists) / span_s, 1) if len(lists) else 0.0,
            "wall_s": round(wall_s, 1), "cpu_s": round(monitor.cpu_seconds, 1),
            "peak_rss_mib": round(monitor.peak_rss / 2 ** 20, 1),
            "latency_ms": {f"p{q}": percentile(latency, q) for q in (50, 95, 99)} | {"samples": int(len(latency))}}


def run_bounded(cfg: Config, system: System, events: int, workdir: Path, log=print) -> dict:
    """Run one system over the whole input topic, as fast as it goes; its figures."""
    return run_bounded_with_lists(cfg, system, events, workdir, log)[0]


def run_bounded_with_lists(cfg: Config, system: System, events: int, workdir: Path, log=print,
                           progress_every_s: float = 2.0) -> tuple[dict, list[dict]]:
    """:func:`run_bounded`, also returning the lists the job wrote (for the evaluator)."""
    kafka_io.ensure_topics(cfg, topic_config={cfg.kafka.output_topic: LOG_APPEND_TIME})
    launched_ms = int(time.time() * 1000)
    started = time.monotonic()
    proc = start_job(cfg, workdir / f"{system.name}.yaml", bounded=True, reference=system.reference)
    monitor = ProcessTreeMonitor(proc.pid)
    monitor.start()
    last_progress = 0.0
    while proc.poll() is None:
        time.sleep(1)
        if time.monotonic() - last_progress >= progress_every_s:
            last_progress = time.monotonic()
            log(f"  [{last_progress - started:5.0f}s] {system.name} running; output topic at "
                f"{sum(kafka_io.end_offsets(cfg, cfg.kafka.output_topic).values()):,} records")
    monitor.stop()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = (workdir / f"{system.name}.log").read_text()[-3000:]
        raise RuntimeError(f"{system.name} job failed (exit {proc.returncode}):\n{tail}")
    lists, closed, written, dead = read_output(cfg)
    return measure(events, lists, closed, written, dead, launched_ms, monitor, wall), lists


def run_paced(cfg: Config, system: System, df: pd.DataFrame, rate: float, seconds: float, workdir: Path,
              log=print, warmup_s: float = 0.0) -> dict:
    """Latency under steady load: the job runs (unbounded) while the log is replayed at ``rate`` events/s.

    A start-up prefix (the first 1 %) is replayed at full speed and the job must have written its first
    list before the paced part starts. The paced part then runs ``warmup_s + seconds``; latency
    percentiles count only windows closed after the first ``warmup_s`` (the JVM is still compiling
    its hot code then: ~25 s of JIT CPU in the first minute on 2 cores), the per-10 s series shows
    them all. After the replay the job runs on until its output stops growing, so a job that falls
    behind shows it in its latency.
    """
    kafka_io.ensure_topics(cfg, topic_config={cfg.kafka.output_topic: LOG_APPEND_TIME})
    warm = max(1000, len(df) // 100)
    paced = df.iloc[warm: warm + int(rate * (warmup_s + seconds))]
    replay.replay(cfg, df.iloc[:warm], progress=False)
    launched_ms = int(time.time() * 1000)
    started = time.monotonic()
    proc = start_job(cfg, workdir / f"paced-{system.name}.yaml", bounded=False, reference=system.reference)
    monitor = ProcessTreeMonitor(proc.pid)
    monitor.start()
    try:
        while sum(kafka_io.end_offsets(cfg, cfg.kafka.output_topic).values()) == 0:
            if proc.poll() is not None:
                raise RuntimeError(f"{system.name} job exited (code {proc.returncode}) before its first list:\n"
                                   + (workdir / f"paced-{system.name}.yaml").with_suffix(".log").read_text()[-3000:])
            if time.monotonic() - started > 300:
                raise RuntimeError(f"{system.name}: no list within 300 s of the start")
            time.sleep(1)
        paced_from_ms = int(time.time() * 1000) + 2000
        since_ms = paced_from_ms + int(warmup_s * 1000)
        log(f"  {system.name} is up after {time.monotonic() - started:.0f}s; replaying {len(paced):,} events "
            f"at {rate:,.0f}/s (latency counted after the first {warmup_s:.0f}s)")
        summary = replay.replay(cfg, paced, progress=False, rate=rate)
        log(f"  {summary}")
        wait_until_output_settles(cfg, quiet_s=cfg.flink.checkpoint_interval_ms / 1000 * 2 + 5, log=log)
    finally:
        monitor.stop()
        stop_job(proc)
    wall = time.monotonic() - started
    out = measure(warm + len(paced), *read_output(cfg), launched_ms, monitor, wall, since_ms, paced_from_ms)
    out["rate"], out["warmup_s"] = rate, warmup_s
    out["achieved_rate"] = round(summary.events_per_s, 1)
    return out


def wait_until_output_settles(cfg: Config, quiet_s: float, timeout_s: float = 900.0, log=print) -> None:
    """Until the output topic has not grown for ``quiet_s`` (a job behind the pace drains its backlog, and
    its last transactions commit), so slow lists are measured rather than cut off."""
    last, since, started = -1, time.monotonic(), time.monotonic()
    while time.monotonic() - started < timeout_s:
        now = sum(kafka_io.end_offsets(cfg, cfg.kafka.output_topic).values())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(1)
    log(f"  WARNING: output still growing after {timeout_s:.0f}s; stopping the job anyway")


def scale_users(df: pd.DataFrame, factor: int) -> pd.DataFrame:
    """A synthetic log with ``factor`` x the users: each user's events dealt round-robin to pseudo-users.

    >>> d = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": list("wxyz"), "behavior": ["view"] * 4, "ts": [1, 2, 3, 4]})
    >>> scale_users(d, 2)["user_id"].tolist()
    ['a~0', 'a~1', 'a~0', 'b~0']
    """
    if factor == 1:
        return df
    out = df.copy()
    nth = out.groupby("user_id").cumcount() % factor
    out["user_id"] = out["user_id"].astype(str) + "~" + nth.astype(str)
    return out


def prepare(cfg: Config, dataset: str, events: int | None, prefix: str, log=print) -> tuple[pd.DataFrame, str, Path]:
    """The local broker (if the config points at it), the log (its first ``events``), the run's tag and folder."""
    from freshet.ops.kafka_local import LocalKafka
    if cfg.kafka.bootstrap_servers == f"127.0.0.1:{cfg.local.kafka_port}":
        LocalKafka(cfg).start(log)
    df = replay.load_log(vendor.ensure_dataset(cfg.local.home_path(), dataset, log), "movielens")
    if events:
        df = df.iloc[:events].reset_index(drop=True)
    tag = f"{prefix}-{dataset}-{int(time.time())}"
    workdir = cfg.local.home_path() / "bench" / tag
    workdir.mkdir(parents=True, exist_ok=True)
    return df, tag, workdir


def header(dataset: str, df: pd.DataFrame) -> dict:
    """What a report says of its data and machine."""
    return {"dataset": dataset, "events": len(df), "users": int(df["user_id"].nunique()),
            "items": int(df["item_id"].nunique()), "machine": machine()}


def bench(cfg: Config, dataset: str, systems: list[str], out_dir: Path, events: int | None = None,
          paced_rate: float = 0.0, paced_seconds: float = 60.0, paced_systems: list[str] | None = None,
          paced_warmup_s: float = 30.0,
          scales: list[int] | None = None, log=print) -> dict:
    from freshet.models.evaluation import evaluate
    unknown = [s for s in systems + (paced_systems or []) if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    started = time.monotonic()
    df, tag, workdir = prepare(cfg, dataset, events, "bench", log)
    created: list[str] = []

    def fresh(name: str, system: System, input_topic: str) -> Config:
        scfg = system_config(cfg.replace(kafka={"input_topic": input_topic}), f"{tag}-{name}", system)
        created.extend(scfg.kafka.topics())
        return scfg

    report = {**header(dataset, df), "config": {
                  "window_ms": cfg.window.size_ms, "parallelism": cfg.flink.parallelism,
                  "checkpoint_interval_ms": cfg.flink.checkpoint_interval_ms, "state_backend": cfg.flink.state_backend,
                  "delivery_guarantee": cfg.flink.delivery_guarantee, "partitions": cfg.kafka.partitions,
                  "python_execution_mode": cfg.flink.execution_mode, "model": {
                      k: getattr(cfg.model, k) for k in ("dim", "negatives", "batch_size", "k")}},
              "systems": {}, "paced": {}, "scaling": {}}
    try:
        input_cfg = cfg.replace(kafka={"input_topic": f"{tag}-events"})
        created.append(input_cfg.kafka.input_topic)
        kafka_io.ensure_topics(input_cfg)
        summary = replay.replay(input_cfg, df)
        log(str(summary))
        report["replay_events_per_s"] = round(summary.events_per_s, 1)
        stream = list(zip(df["user_id"], df["item_id"], df["ts"]))
        for name in systems:
            system = SYSTEMS[name]
            log(f"\n== {name}: {system.description}")
            scfg = fresh(name, system, input_cfg.kafka.input_topic)
            result = run_bounded(scfg, system, len(df), workdir, log)
            if name != "reference":
                result["HR@10"] = round(evaluate(stream, kafka_io.read_json(scfg, scfg.kafka.output_topic),
                                                 ks=(10,)).overall["HR@10"], 4)
            report["systems"][name] = result
            log(summary_line(name, result))
        for name in (paced_systems or []) if paced_rate > 0 else []:
            system = SYSTEMS[name]
            log(f"\n== paced {name} at {paced_rate:,.0f} events/s for {paced_warmup_s:.0f}s warm-up + {paced_seconds:.0f}s")
            scfg = fresh(f"paced-{name}", system, f"{tag}-paced-{name}-events")
            result = run_paced(scfg, system, df, paced_rate, paced_seconds, workdir, log, paced_warmup_s)
            report["paced"][name] = result
            log(summary_line(f"paced {name}", result))
        for factor in scales or []:
            log(f"\n== scaling: full job on a log with {factor}x the users")
            scaled = scale_users(df, factor)
            scfg = fresh(f"x{factor}", SYSTEMS["full"], f"{tag}-x{factor}-events")
            kafka_io.ensure_topics(scfg)
            replay.replay(scfg, scaled, progress=False)
            result = run_bounded(scfg, SYSTEMS["full"], len(scaled), workdir, log)
            result["users"] = int(scaled["user_id"].nunique())
            result["cpu_ms_per_1k_events"] = round(result["cpu_s"] / len(scaled) * 1e6, 1)
            report["scaling"][f"x{factor}"] = result
            log(summary_line(f"x{factor} users", result))
    finally:
        kafka_io.delete_topics(cfg, sorted(set(created)))
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    write_report(report, out_dir, log)
    return report


def machine() -> dict:
    import os
    import psutil
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "cpu_model": _cpu_model(), "python": platform.python_version(), "platform": platform.platform()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def summary_line(name: str, r: dict) -> str:
    lat = r["latency_ms"]
    return (f"{name}: {r['events_per_s']:,.0f} events/s, {r['lists_per_s']:,.0f} lists/s over {r['processing_s']}s "
            f"(start-up {r['startup_s']}s, wall {r['wall_s']}s); CPU {r['cpu_s']}s; peak RSS {r['peak_rss_mib']:,.0f} MiB; "
            f"latency p50/p95/p99 {_ms(lat['p50'])}/{_ms(lat['p95'])}/{_ms(lat['p99'])} ms; "
            f"{r['lists']:,} lists, {r['dead_letters']} dead letters")


def markdown(report: dict) -> str:
    def row(name, r, extra=""):
        lat = r["latency_ms"]
        return (f"| {name} | {r['events_per_s']:,.0f} | {r['lists_per_s']:,.0f} | {r['processing_s']} | "
                f"{r['startup_s']} | {r['cpu_s']} | {r['peak_rss_mib']:,.0f} | {_ms(lat['p50'])} | {_ms(lat['p95'])} | "
                f"{_ms(lat['p99'])} | {r['lists']:,} |{extra}")
    head = ("| system | events/s | lists/s | processing s | start-up s | CPU s | peak RSS MiB | "
            "latency p50 ms | p95 | p99 | lists |")
    rule = "|" + "---|" * 11
    m, c = report["machine"], report["config"]
    lines = [f"Dataset **{report['dataset']}**: {report['events']:,} events, {report['users']:,} users, "
             f"{report['items']:,} items. Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB.",
             f"Job: parallelism {c['parallelism']}, state backend {c.get('state_backend', '?')}, checkpoints every "
             f"{c['checkpoint_interval_ms']} ms, {c['delivery_guarantee']}, Python {c['python_execution_mode']} mode.", "",
             head, rule] + [row(n, r) for n, r in report["systems"].items()]
    systems = report["systems"]
    if "reference" in systems:
        ref = systems["reference"]["events_per_s"]
        lines += [""] + [f"- {n} / reference events/s: **{r['events_per_s'] / ref:.2f}×**"
                         for n, r in systems.items() if n != "reference" and ref]
    if report["paced"]:
        lines += ["", "Paced (latency under steady load):", "", head + " target rate | achieved |",
                  rule + "---|---|"]
        lines += [row(n, r, f" {r['rate']:,.0f} | {r['achieved_rate']:,.0f} |") for n, r in report["paced"].items()]
        lines += ["", "Paced latency p99 (ms) per 10 s of window-close time, from the start of the paced part "
                  "(in brackets: the warm-up, not in the percentiles above):", ""]
        lines += [f"- {n}: " + ", ".join(f"[{s['p99_ms']:,.0f}]" if s["from_s"] < r.get("warmup_s", 0) else f"{s['p99_ms']:,.0f}"
                                         for s in r.get("latency_over_time", []))
                  for n, r in report["paced"].items()]
    if report["scaling"]:
        lines += ["", "Scaling with users (full job, same events):", "",
                  "| users | events/s | CPU s | CPU ms per 1k events | peak RSS MiB |", "|---|---|---|---|---|"]
        lines += [f"| {r['users']:,} ({n}) | {r['events_per_s']:,.0f} | {r['cpu_s']} | {r['cpu_ms_per_1k_events']} | "
                  f"{r['peak_rss_mib']:,.0f} |" for n, r in report["scaling"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path, log=print, name: str | None = None, render=None) -> None:
    """``report`` as <out_dir>/<name>.json and .md (``render``: its Markdown; this module's by default)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (name or f"bench-{report['dataset']}")
    text = (render or markdown)(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(text)
    log("\n" + text)
    log(f"written: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}")
