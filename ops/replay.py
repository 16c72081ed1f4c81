"""Replay a historical log into the input topic in event-time order (Kafka timestamp = event time).

Accepted logs (CONTRACTS §1): the "events" format (CSV or Parquet with ``user_id,item_id,behavior,ts``
and optional ``value,event_id``) and MovieLens ``.inter`` files (``rate`` events, seconds -> ms).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from freshet.conf.settings import Config

EVENT_COLUMNS = ["user_id", "item_id", "behavior", "ts"]
OPTIONAL_COLUMNS = ["value", "event_id"]


class LogFormatError(ValueError):
    """The log file cannot be read in the format asked for."""


def load_log(path: str | Path, fmt: str) -> pd.DataFrame:
    """Read a log into a frame with the event columns, sorted by ``ts`` (stable, so ties keep file order)."""
    path = Path(path)
    if not path.is_file():
        raise LogFormatError(f"log file not found: {path}")
    if fmt == "movielens":
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        cols = {c.split(":")[0]: c for c in df.columns}
        missing = {"user_id", "item_id", "timestamp"} - set(cols)
        if missing:
            raise LogFormatError(f"{path}: a MovieLens .inter file needs columns {sorted(missing)}; "
                                 f"found {list(df.columns)}")
        out = pd.DataFrame({"user_id": df[cols["user_id"]], "item_id": df[cols["item_id"]], "behavior": "rate",
                            "ts": (pd.to_numeric(df[cols["timestamp"]]) * 1000).round().astype("int64")})
        if "rating" in cols:
            out["value"] = pd.to_numeric(df[cols["rating"]])
    elif fmt == "events":
        if path.suffix.lower() in (".parquet", ".pq"):
            out = pd.read_parquet(path)
        else:
            out = pd.read_csv(path, dtype={"user_id": str, "item_id": str, "behavior": str, "event_id": str},
                              keep_default_na=False, na_values={"value": [""], "ts": [""]})
        missing = set(EVENT_COLUMNS) - set(out.columns)
        if missing:
            raise LogFormatError(f"{path}: an events log needs columns {EVENT_COLUMNS}; missing {sorted(missing)}")
        out = out[[c for c in EVENT_COLUMNS + OPTIONAL_COLUMNS if c in out.columns]].copy()
        for c in ("user_id", "item_id", "behavior"):
            out[c] = out[c].astype(str)
        if out["ts"].isna().any():
            raise LogFormatError(f"{path}: column ts has empty values")
        out["ts"] = pd.to_numeric(out["ts"]).astype("int64")
    else:
        raise LogFormatError(f"unknown format {fmt!r}: use 'events' or 'movielens'")
    return out.sort_values("ts", kind="stable").reset_index(drop=True)


def encode(df: pd.DataFrame) -> Iterator[tuple[str, bytes, int]]:
    """(key, JSON value, ts) for each row, in order."""
    users, items, behaviors, tss = (df[c].to_numpy() for c in ("user_id", "item_id", "behavior", "ts"))
    values = df["value"].to_numpy() if "value" in df else None
    ids = df["event_id"].to_numpy() if "event_id" in df else None
    for j in range(len(df)):
        rec = {"user_id": users[j], "item_id": items[j], "behavior": behaviors[j], "ts": int(tss[j])}
        if values is not None and not (isinstance(values[j], float) and math.isnan(values[j])):
            rec["value"] = float(values[j])
        if ids is not None and ids[j] not in ("", None) and not (isinstance(ids[j], float) and np.isnan(ids[j])):
            rec["event_id"] = str(ids[j])
        yield users[j], json.dumps(rec, ensure_ascii=False).encode("utf-8"), int(tss[j])


@dataclass(frozen=True)
class ReplaySummary:
    events: int
    seconds: float
    topic: str
    first_ts: int | None
    last_ts: int | None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (f"replayed {self.events:,} events to '{self.topic}' in {self.seconds:.1f}s "
                f"({self.events_per_s:,.0f} events/s)")


class Progress:
    """A one-line progress bar on stderr (only redrawn a few times a second)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.started = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        frac = done / self.total if self.total else 1.0
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done:,}/{self.total:,} {frac:6.1%} {rate:,.0f}/s")
        if force:
            self.stream.write("\n")
        self.stream.flush()


def replay(cfg: Config, df: pd.DataFrame, topic: str | None = None, speed: float | None = None,
           progress: bool = True, producer_factory: Callable | None = None, rate: float | None = None) -> ReplaySummary:
    """Produce ``df`` to ``topic`` in order; ``speed`` N replays at N x real time, ``rate`` R at R events/s
    (steady load, whatever the timestamps), neither: as fast as possible."""
    from freshet.ops import kafka_io
    topic = topic or cfg.kafka.input_topic
    if producer_factory is None:
        # Before the first record: a missing topic is created like the job's own (partitions, no time-based
        # retention: replays carry historical timestamps); no broker is one clear error, not one per record.
        created = kafka_io.ensure_topics(cfg, names=[topic])
        if created and progress:
            print(f"created topic '{topic}' ({cfg.kafka.partitions} partitions, no time-based retention)",
                  file=sys.stderr)
    prod = (producer_factory or kafka_io.producer)(cfg)
    report = kafka_io.DeliveryReport()
    bar = Progress(len(df), f"replay -> {topic}") if progress else None
    started = time.monotonic()
    first_ts = int(df["ts"].iloc[0]) if len(df) else None
    sent = 0
    for key, value, ts in encode(df):
        if speed is not None or rate is not None:
            due = started + ((ts - first_ts) / 1000.0 / speed if speed is not None else sent / rate)
            delay = due - time.monotonic()
            if delay > 0:
                prod.poll(0)
                time.sleep(delay)
        while True:
            try:
                prod.produce(topic, value=value, key=key.encode("utf-8"), timestamp=ts, on_delivery=report)
                break
            except BufferError:
                prod.poll(0.05)
        sent += 1
        if sent % 10000 == 0:
            prod.poll(0)
            if bar:
                bar.update(sent)
    kafka_io.flush_or_fail(prod, report)
    if bar:
        bar.update(sent, force=True)
    return ReplaySummary(sent, time.monotonic() - started, topic, first_ts,
                         int(df["ts"].iloc[-1]) if len(df) else None)
