"""The Freshet job: Kafka events -> per-user window increments -> online model -> Kafka recommendations.

Run it with ``freshet run`` (local Flink runtime) or ``freshet submit`` (a Flink cluster); as a file it is
also what ``flink run -py`` executes:  ``python -m freshet.jobs.recommender_job --config conf/freshet.yaml``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pyflink.common import Configuration
from pyflink.common.typeinfo import Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import Schema, StreamTableEnvironment

from freshet.conf.settings import Config, load_config
from freshet.jobs import tables
from freshet.ops import vendor
from freshet.ops.python_workers import worker_environment
from freshet.udfs.parse_events import DEAD_LETTERS, EVENT_TYPE, ParseEvents
from freshet.udfs.recommend_online import OUTPUT_TYPE, RecommendOnline, model_shard

JOB_NAME = "freshet-recommender"


def flink_configuration(cfg: Config) -> Configuration:
    """Runtime settings from ``cfg``: Python workers, connector jars, checkpointing, state backend."""
    home = cfg.local.home_path()
    jars = vendor.ensure_connector_jars(home)
    conf = Configuration()
    conf.set_string("pipeline.name", JOB_NAME)
    conf.set_string("pipeline.jars", ";".join(p.resolve().as_uri() for p in jars))
    conf.set_string("python.executable", sys.executable)
    conf.set_string("python.client.executable", sys.executable)
    conf.set_string("python.execution-mode", cfg.flink.execution_mode)
    conf.set_string("parallelism.default", str(cfg.flink.parallelism))
    conf.set_string("state.backend.type", cfg.flink.state_backend)
    conf.set_string("execution.checkpointing.dir", (home / "checkpoints").resolve().as_uri())
    if cfg.flink.checkpoint_interval_ms > 0:
        conf.set_string("execution.checkpointing.interval", f"{cfg.flink.checkpoint_interval_ms} ms")
        conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("table.exec.source.idle-timeout", f"{cfg.window.idleness_ms} ms")
    conf.set_string("restart-strategy.type", "fixed-delay")
    conf.set_string("restart-strategy.fixed-delay.attempts", str(cfg.flink.restart_attempts))
    conf.set_string("restart-strategy.fixed-delay.delay", f"{cfg.flink.restart_delay_ms} ms")
    return conf


def build_pipeline(env: StreamExecutionEnvironment, cfg: Config, bounded: bool) -> StreamTableEnvironment:
    """Wire source -> parse -> window -> model -> sinks onto ``env``; returns the table env holding the sinks."""
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(tables.raw_source_ddl(cfg, "raw_events", bounded))
    t_env.execute_sql(tables.recommendations_sink_ddl(cfg, "recommendations_sink"))
    t_env.execute_sql(tables.json_sink_ddl(cfg, "dead_letter_sink", cfg.kafka.dlq_topic, "dlq"))
    t_env.execute_sql(tables.json_sink_ddl(cfg, "metrics_sink", cfg.kafka.metrics_topic, "metrics"))

    # Kafka -> (value bytes, topic, partition, offset), read in the JVM; per-partition watermarks from `ts`.
    raw = t_env.to_data_stream(t_env.sql_query("SELECT `value`, `topic`, `partition`, `offset` FROM raw_events"))

    # -> accepted events (user_id, item_id, ts, weight); bad records -> dead-letter side output.
    events = (raw.process(ParseEvents(cfg.events, cfg.window), output_type=EVENT_TYPE)
              .name("parse-events").uid("parse-events"))
    dead_letters = events.get_side_output(DEAD_LETTERS)

    # -> the same events as a table with event time from `ts`, keeping the source's watermarks.
    t_env.create_temporary_view("events", t_env.from_data_stream(
        events,
        Schema.new_builder()
        .column_by_expression("rowtime", "TO_TIMESTAMP_LTZ(ts, 3)")
        .watermark("rowtime", "SOURCE_WATERMARK()")
        .build()))

    # -> increment table: one row per (user, window) with aligned item/weight/count arrays (JVM windows).
    increments = t_env.to_data_stream(t_env.sql_query(tables.increments_query(cfg, "events")))

    # -> keyed by model shard (one model per subtask, its state in Flink checkpoints): micro-batched
    #    online learning, top-K per active user when the window closes, live-metrics records.
    shards = cfg.flink.parallelism
    model_output = (increments
                    .key_by(lambda row: model_shard(row[0], shards), key_type=Types.INT())
                    .process(RecommendOnline(cfg), output_type=OUTPUT_TYPE)
                    .name("recommend-online").uid("recommend-online"))
    t_env.create_temporary_view("model_output", t_env.from_data_stream(model_output))

    # -> Kafka: recommendations keyed by user, live metrics, dead letters as JSON (routed in the JVM).
    sinks = t_env.create_statement_set()
    sinks.add_insert_sql("INSERT INTO recommendations_sink SELECT user_id, payload FROM model_output WHERE kind = 'rec'")
    sinks.add_insert_sql("INSERT INTO metrics_sink SELECT payload FROM model_output WHERE kind = 'metrics'")
    sinks.add_insert("dead_letter_sink", t_env.from_data_stream(dead_letters).alias("payload"))
    sinks.attach_as_datastream()
    return t_env


def prepare_local_runtime(cfg: Config) -> None:
    """The local runtime's JVM (started by this process) gets the Python worker environment; logs go to <home>/logs."""
    os.environ.update(worker_environment())
    log_dir = cfg.local.home_path() / "logs" / "flink-local"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir.resolve()))


def run(cfg: Config, bounded: bool) -> None:
    """Build and execute the job on the environment Flink gives us (local runtime, or the cluster's)."""
    prepare_local_runtime(cfg)
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg))
    build_pipeline(env, cfg, bounded)
    env.execute(JOB_NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The Freshet recommender job (used by `freshet run/submit`).")
    parser.add_argument("--config", type=Path, help="YAML config (default conf/freshet.yaml)")
    parser.add_argument("--bounded", action="store_true", help="stop when the input topic is drained")
    args = parser.parse_args(argv)
    run(load_config(args.config), args.bounded)


if __name__ == "__main__":
    main()
