"""Running the job locally with progress output, and the end-to-end demo."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from freshet.conf.settings import Config, ConfigError
from freshet.ops import kafka_io


def topic_count(cfg: Config, topic: str) -> int:
    """Records in ``topic`` (sum of partition end offsets; transactional markers included)."""
    return sum(kafka_io.end_offsets(cfg, topic).values())


class TopicProgress(threading.Thread):
    """Prints how far the output topics have grown while a job runs."""

    def __init__(self, cfg: Config, every_s: float = 5.0, log=print):
        super().__init__(daemon=True)
        self.cfg, self.every_s, self.log = cfg, every_s, log
        self._halt = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            try:
                recs = topic_count(self.cfg, self.cfg.kafka.output_topic)
                dlq = topic_count(self.cfg, self.cfg.kafka.dlq_topic)
            except Exception as e:  # progress is best effort; never kill the run over it
                recs = dlq = f"? ({e})"
            self.log(f"[{time.monotonic() - self.started:6.0f}s] job running: recommendations topic "
                     f"{recs} records, dead letters {dlq} (counts include transaction markers)")

    def stop(self) -> None:
        self._halt.set()


def run_job(cfg: Config, bounded: bool, log=print, from_savepoint: str | None = None) -> float:
    """Run the job on the local Flink runtime, from a savepoint or retained checkpoint if given (``latest``:
    the newest retained checkpoint of any earlier job); returns wall seconds."""
    from freshet.jobs import recommender_job
    from freshet.ops import savepoints
    if from_savepoint == "latest":
        found = savepoints.latest_checkpoint(cfg)
        if found is None:
            raise ConfigError(f"no retained checkpoint under {savepoints.checkpoint_dir(cfg)}")
        from_savepoint = str(found)
    if from_savepoint:
        savepoints.check_resume(cfg, from_savepoint, bounded)
    kafka_io.ensure_topics(cfg)
    progress = TopicProgress(cfg, log=log)
    started = time.monotonic()
    log(f"starting the job on the local Flink runtime ({'bounded' if bounded else 'unbounded'}; "
        f"input '{cfg.kafka.input_topic}' at {cfg.kafka.bootstrap_servers}"
        + (f"; resuming from {from_savepoint}" if from_savepoint else "") + ")")
    log(f"checkpoints are kept in {savepoints.checkpoint_dir(cfg)}/<job id>/chk-<n>; a stopped run resumes "
        "with `freshet run --from-savepoint latest` (or that folder)")
    progress.start()
    try:
        recommender_job.run(cfg, bounded, from_savepoint=from_savepoint)
    finally:
        progress.stop()
    seconds = time.monotonic() - started
    log(f"job finished in {seconds:.1f}s")
    return seconds


@dataclass(frozen=True)
class DemoSummary:
    events_in: int
    accepted: int
    recommendations: int
    users: int
    dead_letters: int
    replay_events_per_s: float
    job_seconds: float
    wall_seconds: float
    hr10: float
    ndcg10: float
    coverage: float
    model: str

    def lines(self) -> list[str]:
        return [
            f"model                {self.model:>10}  (model.kind; e.g. FRESHET_MODEL__KIND=bpr scripts/demo runs another)",
            f"events in            {self.events_in:>10,}  (replayed at {self.replay_events_per_s:,.0f} events/s)",
            f"accepted events      {self.accepted:>10,}",
            f"dead letters         {self.dead_letters:>10,}",
            f"recommendations out  {self.recommendations:>10,}  for {self.users:,} users",
            f"job time             {self.job_seconds:>10.1f}s  ({self.events_in / max(self.job_seconds, 1e-9):,.0f} events/s incl. start-up)",
            f"HR@10 / NDCG@10      {self.hr10:>10.4f} / {self.ndcg10:.4f}  (prequential, coverage {self.coverage:.1%})",
            f"wall time            {self.wall_seconds:>10.1f}s",
        ]


def demo(cfg: Config, dataset: str = "ml-100k", sample: int = 3, log=print) -> DemoSummary:
    """Fresh topics, replay a MovieLens log, run the job bounded, read recommendations back, summarise."""
    from freshet.models.evaluation import evaluate
    from freshet.ops import replay, vendor
    from freshet.ops.kafka_local import LocalKafka

    started = time.monotonic()
    LocalKafka(cfg).start(log)
    inter = vendor.ensure_dataset(cfg.local.home_path(), dataset, log)
    log(f"resetting topics {', '.join(cfg.kafka.topics())}")
    kafka_io.delete_topics(cfg, cfg.kafka.topics())
    kafka_io.ensure_topics(cfg)
    df = replay.load_log(inter, "movielens")
    summary = replay.replay(cfg, df)
    log(str(summary))
    job_seconds = run_job(cfg, bounded=True, log=log)
    recs = kafka_io.read_json(cfg, cfg.kafka.output_topic)
    dead = kafka_io.read_json(cfg, cfg.kafka.dlq_topic)
    log(f"\nsample recommendations read back from '{cfg.kafka.output_topic}' (read_committed):")
    for rec in recs[-sample:]:
        log("  " + json.dumps(rec)[:300])
    result = evaluate(zip(df["user_id"], df["item_id"], df["ts"]), recs, ks=(10,))
    accepted = len(df) - len(dead)
    out = DemoSummary(len(df), accepted, len(recs), len({r["user_id"] for r in recs}), len(dead),
                      summary.events_per_s, job_seconds, time.monotonic() - started,
                      result.overall["HR@10"], result.overall["NDCG@10"], result.overall["coverage"], cfg.model.kind)
    log("\nsummary")
    for line in out.lines():
        log("  " + line)
    report = cfg.local.home_path() / "demo-summary.json"
    report.write_text(json.dumps(out.__dict__, indent=2))
    log(f"  (written to {Path(report)})")
    return out
