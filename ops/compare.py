"""Quality and speed of every model kind next to its baselines, all through the real pipeline in one run.

The log is replayed once into a fresh input topic; then each system runs as its own bounded job
(Kafka -> Flink -> Kafka) on that same topic with its own output topic, one after another, measured
like ``freshet bench`` measures (events/s, CPU seconds and peak RSS of the job's process tree), and
every output is scored by the same prequential evaluator (CONTRACTS §3). Results: JSON, a Markdown
table, a PNG plot of HR@10 per day.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from freshet.conf.settings import Config
from freshet.models.evaluation import evaluate
from freshet.ops import kafka_io, replay, vendor
from freshet.ops.bench import System, run_bounded_with_lists, system_config

FROZEN_SHARE = 0.2   # the frozen model learns from the first 20 % of the log (CONTRACTS §3)
SYNC_CADENCES = {"10min": 600_000, "1h": 3_600_000, "1d": 86_400_000}   # 10 min = every 10 one-minute windows
# recent-popularity's half-life: the best of 30 / 90 / 365 days on both MovieLens logs (docs/EVALUATION.md)
RECENT_HALF_LIFE_MS = 90 * 86_400_000
DEFAULT_SYSTEMS = "sequence,bpr,transition,recent-popularity,popularity,frozen"


def systems_for(df: pd.DataFrame, cfg: Config) -> dict[str, System]:
    cutoff = int(df["ts"].quantile(FROZEN_SHARE))
    kind = cfg.model.kind
    return {
        "sequence": System("sequence", "the sequence model: the user's last items -> next window (sampled softmax)",
                           {"model": {"kind": "sequence"}}),
        "bpr": System("bpr", "online BPR matrix factorisation", {"model": {"kind": "bpr"}}),
        "online": System("online", f"the configured model ({kind}), updated every window", {}),
        "transition": System("transition", "counted item-to-item transitions from the user's last items, "
                                           "co-occurrence either way, mixed with popularity",
                             {"model": {"kind": "transition"}}),
        "recent-popularity": System("recent-popularity", f"popularity with a {RECENT_HALF_LIFE_MS // 86_400_000}-day "
                                                         "half-life, same seen-item filter and window cadence",
                                    {"model": {"kind": "recent-popularity",
                                               "popularity_half_life_ms": RECENT_HALF_LIFE_MS}}),
        "popularity": System("popularity", "cumulative popularity, same seen-item filter and window cadence",
                             {"model": {"kind": "popularity"}}),
        "frozen": System("frozen", f"the configured model ({kind}) frozen after the first {FROZEN_SHARE:.0%} of the "
                                   f"log (ts {cutoff})", {"model": {"freeze_after_ms": cutoff}}),
        # Update cadences (Monolith, Table 2): training never stops, but lists are served from
        # parameters synced every T of event time; "online" syncs after every micro-batch (BPR only).
        **{f"sync-{label}": System(f"sync-{label}", f"BPR serving parameters synced every {label} of event time",
                                   {"model": {"kind": "bpr", "sync_every_ms": ms}})
           for label, ms in SYNC_CADENCES.items()},
    }


def compare(cfg: Config, dataset: str, systems: list[str], out_dir: Path, log=print) -> dict:
    from freshet.ops.kafka_local import LocalKafka
    started = time.monotonic()
    df = replay.load_log(vendor.ensure_dataset(cfg.local.home_path(), dataset, log), "movielens")
    available = systems_for(df, cfg)
    unknown = [s for s in systems if s not in available]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; known: {', '.join(available)}")
    if cfg.kafka.bootstrap_servers == f"127.0.0.1:{cfg.local.kafka_port}":
        LocalKafka(cfg).start(log)
    tag = f"compare-{dataset}-{int(time.time())}"
    workdir = cfg.local.home_path() / "compare" / tag
    # Lists of 20 items so HR@20 is measured too; their first 10 are exactly the K=10 lists.
    base = cfg.replace(kafka={"input_topic": f"{tag}-events", "output_topic": f"{tag}-recs",
                              "dlq_topic": f"{tag}-dlq", "metrics_topic": f"{tag}-metrics",
                              "sync_topic": f"{tag}-sync"}, model={"k": max(cfg.model.k, 20)})
    kafka_io.ensure_topics(base)
    log(str(replay.replay(base, df)))
    events = list(zip(df["user_id"], df["item_id"], df["ts"]))
    results = {}
    created = list(base.kafka.topics())
    report: dict = {}
    try:
        for j, name in enumerate(systems, 1):
            system = available[name]
            scfg = system_config(base, tag, system)
            created += scfg.kafka.topics()[1:]
            log(f"\n== [{j}/{len(systems)}] {name}: {system.description}")
            speed, recs = run_bounded_with_lists(scfg, system, len(df), workdir, log, progress_every_s=30.0)
            if not recs or speed["dead_letters"]:
                log(f"WARNING: {name} wrote {len(recs)} lists and {speed['dead_letters']} dead letters")
            result = evaluate(events, recs, ks=(10, 20))
            model_s = model_seconds(kafka_io.read_json(scfg, scfg.kafka.metrics_topic))
            results[name] = {"description": system.description, "kind": scfg.model.kind, "lists": len(recs),
                             "dead_letters": speed["dead_letters"],
                             **{k: round(v, 5) for k, v in result.overall.items()},
                             "events_per_s": speed["events_per_s"], "processing_s": speed["processing_s"],
                             "cpu_s": speed["cpu_s"], "model_s": model_s, "peak_rss_mib": speed["peak_rss_mib"],
                             "latency_ms": speed["latency_ms"],   # window closed -> list written, p50/p95/p99
                             "job_seconds": speed["wall_s"],
                             "by_day": {str(d): m["HR@10"] for d, m in sorted(result.by_day.items())}}
            log(f"{name}: HR@10 {result.overall['HR@10']:.4f}  NDCG@10 {result.overall['NDCG@10']:.4f}  "
                f"HR@20 {result.overall['HR@20']:.4f}  coverage {result.overall['coverage']:.1%}  ({len(recs):,} lists; "
                f"{speed['events_per_s']:,.0f} events/s, {speed['cpu_s']:.0f} CPU s, {model_s:.0f} s in model calls)")
            report = {"dataset": dataset, "events": len(df), "window_ms": cfg.window.size_ms,
                      "model": {k: v for k, v in cfg.model.__dict__.items()}, "systems": results,
                      "complete": j == len(systems), "wall_seconds": round(time.monotonic() - started, 1)}
            write_report(report, out_dir, log if j == len(systems) else (lambda *_: None))   # a long run keeps what it has
    finally:
        kafka_io.delete_topics(base, created)
    return report


def model_seconds(metrics: list[dict]) -> float:
    """Seconds a job spent inside model calls: each shard's last metrics record, summed.

    >>> model_seconds([{"shard": 0, "emitted_at": 1, "model_call_seconds": 2.0},
    ...                {"shard": 0, "emitted_at": 5, "model_call_seconds": 7.5}, {"shard": 1, "emitted_at": 3}])
    7.5
    """
    last: dict = {}
    for record in metrics:
        if record.get("emitted_at", 0) >= last.get(record.get("shard"), {}).get("emitted_at", -1):
            last[record.get("shard")] = record
    return round(sum(r.get("model_call_seconds", 0.0) for r in last.values()), 1)


def markdown_table(report: dict) -> str:
    rows = ["| system | HR@10 | NDCG@10 | HR@20 | coverage | lists | events/s | CPU s | model s | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["systems"].items():
        rows.append(f"| {name} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['HR@20']:.4f} | {r['coverage']:.1%} | "
                    f"{r['lists']:,} | {r.get('events_per_s', 0):,.0f} | {r.get('cpu_s', '')} | {r.get('model_s', '')} | "
                    f"{r.get('peak_rss_mib', '')} |")
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
