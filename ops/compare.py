"""Quality of the online model next to its baselines, all through the real pipeline in one run.

The log is replayed once into a fresh input topic; then each system runs as its own bounded job
(Kafka -> Flink -> Kafka) on that same topic with its own output topic, and every output is scored
by the same prequential evaluator (CONTRACTS §3). Results: JSON, a Markdown table, a PNG plot.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from freshet.conf.settings import Config, dump_config
from freshet.models.evaluation import evaluate
from freshet.ops import kafka_io, replay, vendor

FROZEN_SHARE = 0.2   # the frozen model learns from the first 20 % of the log (CONTRACTS §3)
SYNC_CADENCES = {"10min": 600_000, "1h": 3_600_000, "1d": 86_400_000}   # 10 min = every 10 one-minute windows


@dataclass(frozen=True)
class System:
    name: str
    overrides: dict          # config sections -> keys, applied on top of the base config
    description: str


def systems_for(df: pd.DataFrame) -> dict[str, System]:
    cutoff = int(df["ts"].quantile(FROZEN_SHARE))
    return {
        "online": System("online", {}, "Freshet's online model, updated every window"),
        "popularity": System("popularity", {"model": {"kind": "popularity"}},
                             "cumulative popularity, same seen-item filter and window cadence"),
        "frozen": System("frozen", {"model": {"freeze_after_ms": cutoff}},
                         f"the online model frozen after the first {FROZEN_SHARE:.0%} of the log (ts {cutoff})"),
        # Update cadences (Monolith, Table 2): training never stops, but lists are served from
        # parameters synced every T of event time; "online" syncs after every micro-batch.
        **{f"sync-{label}": System(f"sync-{label}", {"model": {"sync_every_ms": ms}},
                                   f"the online model serving parameters synced every {label} of event time")
           for label, ms in SYNC_CADENCES.items()},
    }


def compare(cfg: Config, dataset: str, systems: list[str], out_dir: Path, log=print) -> dict:
    from freshet.ops.kafka_local import LocalKafka
    started = time.monotonic()
    if cfg.kafka.bootstrap_servers == f"127.0.0.1:{cfg.local.kafka_port}":
        LocalKafka(cfg).start(log)
    df = replay.load_log(vendor.ensure_dataset(cfg.local.home_path(), dataset, log), "movielens")
    available = systems_for(df)
    unknown = [s for s in systems if s not in available]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; known: {', '.join(available)}")
    tag = f"compare-{dataset}-{int(time.time())}"
    # Lists of 20 items so HR@20 is measured too; their first 10 are exactly the K=10 lists.
    base = cfg.replace(kafka={"input_topic": f"{tag}-events", "output_topic": f"{tag}-recs",
                              "dlq_topic": f"{tag}-dlq", "metrics_topic": f"{tag}-metrics"}, model={"k": max(cfg.model.k, 20)})
    kafka_io.ensure_topics(base)
    log(str(replay.replay(base, df)))
    events = list(zip(df["user_id"], df["item_id"], df["ts"]))
    results = {}
    for name in systems:
        system = available[name]
        sections = {section: dict(values) for section, values in system.overrides.items()}
        sections.setdefault("kafka", {}).update({"output_topic": f"{tag}-recs-{name}", "dlq_topic": f"{tag}-dlq-{name}",
                                                 "metrics_topic": f"{tag}-metrics-{name}",
                                                 "group_id": f"{tag}-{name}"})
        sections.setdefault("flink", {})["transactional_id_prefix"] = f"{tag}-{name}"
        scfg = base.replace(**sections)
        log(f"\n== {name}: {system.description}")
        job_s = _run_in_own_process(scfg, out_dir / f".{tag}-{name}.yaml", log)
        recs = kafka_io.read_json(scfg, scfg.kafka.output_topic)
        dead = kafka_io.read_json(scfg, scfg.kafka.dlq_topic)
        if not recs or dead:
            log(f"WARNING: {name} wrote {len(recs)} lists and {len(dead)} dead letters "
                f"(first reasons: {[d['reason'] for d in dead[:3]]})")
        result = evaluate(events, recs, ks=(10, 20))
        results[name] = {"description": system.description, "job_seconds": round(job_s, 1), "lists": len(recs),
                         "dead_letters": len(dead),
                         **{k: round(v, 5) for k, v in result.overall.items()},
                         "by_day": {str(d): m["HR@10"] for d, m in sorted(result.by_day.items())}}
        log(f"{name}: HR@10 {result.overall['HR@10']:.4f}  NDCG@10 {result.overall['NDCG@10']:.4f}  "
            f"HR@20 {result.overall['HR@20']:.4f}  coverage {result.overall['coverage']:.1%}  ({len(recs):,} lists)")
    report = {"dataset": dataset, "events": len(df), "window_ms": cfg.window.size_ms,
              "model": {k: v for k, v in cfg.model.__dict__.items()}, "systems": results,
              "wall_seconds": round(time.monotonic() - started, 1)}
    write_report(report, out_dir, log)
    kafka_io.delete_topics(base, base.kafka.topics() + [f"{tag}-{x}-{n}" for n in systems for x in ("recs", "dlq", "metrics")])
    return report


def _run_in_own_process(cfg: Config, config_file: Path, log=print) -> float:
    """One job per process: a second job on the same PyFlink gateway in one process does not run cleanly."""
    config_file.parent.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, config_file)
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "freshet.scripts.cli", "run", "--bounded", "--config",
                               str(config_file)], capture_output=True, text=True)
    finally:
        config_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"job failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def markdown_table(report: dict) -> str:
    rows = ["| system | HR@10 | NDCG@10 | HR@20 | coverage | lists | job s |", "|---|---|---|---|---|---|---|"]
    for name, r in report["systems"].items():
        rows.append(f"| {name} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['HR@20']:.4f} | {r['coverage']:.1%} | "
                    f"{r['lists']:,} | {r['job_seconds']} |")
    return "\n".join(rows)


def write_report(report: dict, out_dir: Path, log=print) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quality-{report['dataset']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown_table(report) + "\n")
    log("\n" + markdown_table(report))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(matplotlib not installed: no plot; pip install -e .[eval])")
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, r in report["systems"].items():
        days = sorted(int(d) for d in r["by_day"])
        series = pd.Series([r["by_day"][str(d)] for d in days], index=days).rolling(7, min_periods=1).mean()
        ax.plot([pd.Timestamp(d * 86_400_000, unit="ms") for d in days], series.values, label=name)
    ax.set_title(f"HR@10 over event time ({report['dataset']}, 7-day rolling mean)")
    ax.set_ylabel("HR@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    log(f"written: {stem}.json, .md, .png")
