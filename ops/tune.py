"""Reproducible model tuning on a MovieLens log, with the model alone (no Kafka, no Flink).

The increments are built exactly as the job's window aggregation builds them (per user and tumbling
window: summed weight and count per item), and windows are learned and listed in the same order, so
HR@10 here equals the job's (checked on ML-100K: sequence 0.1626 and BPR 0.1158, here and through Kafka ->
Flink -> Kafka). Use it to choose settings quickly; report quality from ``freshet compare``, which runs the
real pipeline.

Two grid axes are not model settings but simulate a parallel model (``models/shared.py``): ``replicas``
models each learn from their share of the users (by a hash of the id) and, with ``sync_every_events``
> 0, export their shared changes after every that many events and apply each other's one interval
later, as the job's sync loop delivers them (a checkpoint after they were written).
"""
from __future__ import annotations

import itertools
import json
import time
import zlib
from pathlib import Path

import pandas as pd

from freshet.conf.settings import Config
from freshet.models.evaluation import evaluate
from freshet.models.events import EventValidator
from freshet.models.increments import Increment


def window_increments(df: pd.DataFrame, cfg: Config) -> list[tuple[int, list[Increment]]]:
    """The job's increment table, computed with pandas: [(window_end, [Increment, ...]), ...] in order."""
    validator = EventValidator(cfg.events)
    size = cfg.window.size_ms
    frame = pd.DataFrame({
        "user_id": df["user_id"], "item_id": df["item_id"],
        "weight": [validator.weight(b, v) for b, v in zip(df["behavior"], df.get("value", [None] * len(df)))],
        "window_end": df["ts"] - df["ts"] % size + size})
    per_item = frame.groupby(["window_end", "user_id", "item_id"], sort=False).agg(
        weight=("weight", "sum"), count=("weight", "size")).reset_index()
    windows = []
    for end, block in per_item.groupby("window_end", sort=True):
        incs = [Increment.from_arrays(user, int(end), list(g["item_id"]), list(g["weight"]), list(g["count"]),
                                      cfg.window.max_items_per_increment)
                for user, g in block.groupby("user_id", sort=True)]   # id order, as the job has them
        windows.append((int(end), incs))
    return windows


def score(cfg: Config, df: pd.DataFrame, windows, chunk: int = 100, replicas: int = 1, sync_every: int = 0) -> dict:
    """HR@10 (and more) of the model on the windows, learned ``chunk`` windows per call; ``replicas`` > 1:
    that many replicas of the model, synced every ``sync_every`` events (0: never), see the module doc."""
    from freshet.models.shared import SharedDelta
    from freshet.udfs.recommend_online import build_model
    models = [build_model(cfg) for _ in range(replicas)]
    syncing = replicas > 1 and sync_every > 0
    for model in models if syncing else ():
        model.start_sync()
    started = time.perf_counter()
    recs, since, in_flight, sync_bytes = [], 0, [], 0
    for j in range(0, len(windows), chunk):
        part = windows[j:j + chunk]
        for r, model in enumerate(models):
            mine = [(end, [i for i in incs if replicas == 1 or zlib.crc32(i.user_id.encode()) % replicas == r])
                    for end, incs in part]
            mine = [(end, incs) for end, incs in mine if incs]      # as the job: a shard gets only its windows
            recs += [{"user_id": w.user_id, "items": w.rec.items, "window_end": w.window_end}
                     for w in model.learn_windows(mine, cfg.model.batch_size, cfg.model.k, cfg.model.exclude_seen)]
        since += sum(inc.events for _, incs in part for inc in incs)
        if syncing and since >= sync_every:
            since = 0
            arrived, in_flight = in_flight, [m.export_shared().to_bytes() for m in models]
            sync_bytes += sum(map(len, arrived))
            for r, model in enumerate(models):
                for q, blob in enumerate(arrived):
                    if q != r:
                        model.apply_shared(SharedDelta.from_bytes(blob))
    seconds = time.perf_counter() - started
    result = evaluate(zip(df["user_id"], df["item_id"], df["ts"]), recs, ks=(10,)).overall
    return {"HR@10": round(result["HR@10"], 4), "NDCG@10": round(result["NDCG@10"], 4),
            "coverage": round(result["coverage"], 4), "model_seconds": round(seconds, 1),
            **({"sync_bytes": sync_bytes} if syncing else {})}


NOT_MODEL = ("window_ms", "replicas", "sync_every_events")     # grid axes that are not model settings


def parse_grid(spec: list[str]) -> list[dict]:
    """``["learning_rate=0.2,0.4", "kind=bpr"]`` -> every combination; values parsed as JSON (numbers,
    booleans), else kept as text.

    >>> parse_grid(["kind=bpr,sequence", "dim=16"])
    [{'kind': 'bpr', 'dim': 16}, {'kind': 'sequence', 'dim': 16}]
    """
    axes = []
    for item in spec:
        key, _, values = item.partition("=")
        if not values:
            raise ValueError(f"grid axis {item!r} must look like key=v1,v2")
        axes.append([(key, _value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tune(cfg: Config, df: pd.DataFrame, grid: list[dict], out: Path | None, log=print) -> list[dict]:
    rows = []
    windows_for: dict[int, list] = {}
    for point in grid:
        window = {"size_ms": point["window_ms"]} if "window_ms" in point else {}
        model = {k: v for k, v in point.items() if k not in NOT_MODEL}
        pcfg = cfg.replace(model=model, window=window)
        if pcfg.window.size_ms not in windows_for:
            windows_for[pcfg.window.size_ms] = window_increments(df, pcfg)
        row = {**point, **score(pcfg, df, windows_for[pcfg.window.size_ms], replicas=int(point.get("replicas", 1)),
                                sync_every=int(point.get("sync_every_events", 0)))}
        log(json.dumps(row))
        rows.append(row)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
    return rows
