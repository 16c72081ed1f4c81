"""The Freshet job: Kafka events -> per-user window increments -> online model -> Kafka recommendations.

Run it with ``freshet run`` (local Flink runtime) or ``freshet submit`` (a Flink cluster); as a file it is
also what ``flink run -py`` executes:  ``python -m freshet.jobs.recommender_job --config conf/freshet.yaml``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pyflink.common import Configuration
from pyflink.common.typeinfo import Types
from pyflink.datastream import DataStream, KeyedStream, StreamExecutionEnvironment
from pyflink.java_gateway import get_gateway
from pyflink.table import DataTypes, Schema, StatementSet, StreamTableEnvironment

from freshet.conf.settings import Config, load_config
from freshet.jobs import tables
from freshet.ops import processes, savepoints, vendor
from freshet.ops.python_workers import worker_environment
from freshet.udfs.parse_events import RESULT_NAMES as PARSED_COLUMNS, parse_event_function
from freshet.udfs.recommend_online import (INPUT_TYPE, OUTPUT_TYPE, RecommendOnline, RecommendOnlineSynced,
                                           replica_sync_on)

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
    conf.set_string("python.fn-execution.bundle.time", str(cfg.flink.python_bundle_time_ms))
    conf.set_string("python.fn-execution.bundle.size", str(cfg.flink.python_bundle_size))
    conf.set_string("parallelism.default", str(cfg.flink.parallelism))
    conf.set_string("pipeline.max-parallelism", str(cfg.flink.max_parallelism))
    conf.set_string("state.backend.type", cfg.flink.state_backend)
    conf.set_string("execution.checkpointing.dir", savepoints.checkpoint_dir(cfg).resolve().as_uri())
    conf.set_string("execution.checkpointing.savepoint-dir", savepoints.savepoint_dir(cfg).resolve().as_uri())
    # A cancelled job, or one whose client died, can resume from its last checkpoint (`--from-savepoint`).
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    if cfg.flink.checkpoint_interval_ms > 0:
        conf.set_string("execution.checkpointing.interval", f"{cfg.flink.checkpoint_interval_ms} ms")
        conf.set_string("execution.checkpointing.mode", "EXACTLY_ONCE")
    conf.set_string("table.exec.source.idle-timeout", f"{cfg.window.idleness_ms} ms")
    conf.set_string("pipeline.auto-watermark-interval", f"{cfg.flink.watermark_interval_ms} ms")
    # Restarts back off: a TaskManager killed with -9 is still listed for a few seconds, and every attempt meanwhile
    # fails at deployment and restarts the survivors' tasks (their Python operators start TensorFlow each time); a
    # broker outage of minutes is outlived rather than ending the job after a fixed number of quick attempts.
    conf.set_string("restart-strategy.type", "exponential-delay")
    conf.set_string("restart-strategy.exponential-delay.initial-backoff", f"{cfg.flink.restart_delay_ms} ms")
    conf.set_string("restart-strategy.exponential-delay.max-backoff", f"{cfg.flink.restart_max_delay_ms} ms")
    conf.set_string("restart-strategy.exponential-delay.backoff-multiplier", "1.5")
    conf.set_string("restart-strategy.exponential-delay.attempts-before-reset-backoff", str(cfg.flink.restart_attempts))
    conf.set_string("restart-strategy.exponential-delay.reset-backoff-threshold", "10 min")
    return conf


def _create_tables(t_env: StreamTableEnvironment, cfg: Config, bounded: bool) -> None:
    """Kafka source and sinks, and the source's records with ``canonical``: true when the JVM can parse them."""
    t_env.execute_sql(tables.raw_source_ddl(cfg, "raw_events", bounded))
    t_env.execute_sql(tables.recommendations_sink_ddl(cfg, "recommendations_sink"))
    t_env.execute_sql(tables.json_sink_ddl(cfg, "dead_letter_sink", cfg.kafka.dlq_topic, "dlq"))
    t_env.execute_sql(tables.json_sink_ddl(cfg, "metrics_sink", cfg.kafka.metrics_topic, "metrics"))
    t_env.create_temporary_view("classified", t_env.sql_query(tables.classified_query(cfg, "raw_events")))


def _classified_once(t_env: StreamTableEnvironment) -> str:
    """``classified`` computed once per record; returns the view's name.

    A query with one output (the stream to the model) is optimised as one tree, and the planner copies
    a view's expressions into each consumer: the canonical-record regex, the decoding of the value and
    the JSON parse of ``ts`` ran once for the fast path, once for the Python path and once for the late
    check. A table read back from a DataStream is a boundary the planner cannot merge across (the
    reference, a statement set of several sinks, gets the same from the planner's common blocks).
    Event time and watermarks pass through as they are (``SOURCE_WATERMARK()``).
    """
    stream = t_env.to_data_stream(t_env.sql_query(
        "SELECT `value`, `topic`, `partition`, `offset`, rowtime AS event_time, text, canonical FROM classified"))
    t_env.create_temporary_view("classified_once", t_env.from_data_stream(stream, Schema.new_builder()
                                .column_by_metadata("rowtime", DataTypes.TIMESTAMP_LTZ(3))
                                .column_by_expression("proc", "PROCTIME()")      # arrival order, for dedup
                                .watermark("rowtime", "SOURCE_WATERMARK()").build()))
    return "classified_once"


def _drop_duplicates(t_env: StreamTableEnvironment, cfg: Config, parsed: str) -> None:
    """``accepted``: every valid event, the first copy of each ``event_id`` only; ``duplicate_letters``: dead
    letters for the other copies (counted in Flink state keyed by ``event_id``; see ``tables.copies_query``).
    Events without an ``event_id`` skip the count."""
    columns = "user_id, item_id, ts, weight, `value`, `topic`, `partition`, `offset`, rowtime"
    accepted = f"SELECT {columns} FROM fast_events UNION ALL SELECT {columns} FROM {parsed} WHERE dead_letter IS NULL"
    duplicates = f"SELECT CAST(NULL AS STRING) AS payload FROM {parsed} WHERE FALSE"
    if cfg.events.dedup_horizon_ms > 0:
        t_env.get_config().set("table.exec.state.ttl", f"{cfg.events.dedup_horizon_ms} ms")
        t_env.create_temporary_view("with_copies", t_env.sql_query(tables.copies_query(parsed)))
        accepted += f" AND event_id IS NULL UNION ALL SELECT {columns} FROM with_copies WHERE copies = 1"
        reason = "CONCAT('duplicate: event_id ', event_id, ' arrived ', CAST(copies - 1 AS STRING), ' time(s) before')"
        duplicates = f"SELECT {tables.dead_letter_sql(reason)} AS payload FROM with_copies WHERE copies > 1"
    t_env.create_temporary_view("accepted", t_env.sql_query(accepted))
    t_env.create_temporary_view("duplicate_letters", t_env.sql_query(duplicates))


def _split_late(t_env: StreamTableEnvironment, cfg: Config, accepted: str) -> None:
    """``on_time`` events go on to the windows; ``late_letters``: dead letters for events whose window had fired."""
    late = tables.late_sql(cfg, "ts")
    t_env.create_temporary_view("on_time", t_env.sql_query(
        f"SELECT * FROM {accepted} WHERE NOT COALESCE({late}, FALSE)"))
    t_env.create_temporary_view("late_letters", t_env.sql_query(
        f"SELECT {tables.dead_letter_sql(tables.late_reason_sql(cfg))} AS payload FROM {accepted} WHERE {late}"))


def _keyed_by_first_field(stream: DataStream, key_type, row_type) -> KeyedStream:
    """``stream`` of (key, row) keyed by its first field, for a Python keyed function that gets ``row``.

    ``DataStream.key_by`` with a key selector runs a Python operator of its own (``AddKey``) in front of
    the keyed one, which wraps every row as (key, row): one more crossing into Python and back per row.
    This builds the same keyed stream from rows that arrive wrapped, with PyFlink's own Java key selector.
    """
    j_keyed = stream._j_data_stream.keyBy(get_gateway().jvm.KeyByKeySelector(), Types.ROW([key_type]).get_java_type_info())
    return KeyedStream(j_keyed, row_type, stream)


def subtask_of(key: int, parallelism: int, max_parallelism: int) -> int:
    """The subtask Flink's key groups put a model-shard key on (asked of Flink itself, for the one-field row the
    job keys by)."""
    jvm = get_gateway().jvm
    row = jvm.org.apache.flink.types.Row(1)
    row.setField(0, int(key))
    return int(jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment.assignKeyToParallelOperator(
        row, max_parallelism, parallelism))


def shard_keys(parallelism: int, max_parallelism: int) -> list[int]:
    """One model-shard key per subtask: the smallest int that Flink's key groups put on subtask j, for j = 0..p-1.
    With keys 0..p-1 instead, two shards can share a subtask while another idles."""
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < parallelism:
        keys.setdefault(subtask_of(candidate, parallelism, max_parallelism), candidate)
        candidate += 1
    return [keys[j] for j in range(parallelism)]


def model_shards(cfg: Config, from_savepoint: str | None = None) -> savepoints.ShardLayout:
    """The job's model shards: one per subtask; resumed, the savepoint's shards, rescaled to ``flink.parallelism``
    (``savepoints.rescaled_shards``: kept at a lower parallelism, doubled by copies at a higher one)."""
    p, max_p = cfg.flink.parallelism, cfg.flink.max_parallelism
    saved = savepoints.saved_config(cfg, from_savepoint) if from_savepoint else None
    if not saved:
        return savepoints.ShardLayout(shard_keys(p, max_p), {})
    old = saved.get("shard_keys") or shard_keys(int(saved["flink"]["parallelism"]), max_p)
    keys, seeds = savepoints.rescaled_shards(old, p, lambda key: subtask_of(key, p, max_p))
    return savepoints.ShardLayout(keys, seeds, savepoints.singleton_shards(saved))


def build_pipeline(env: StreamExecutionEnvironment, cfg: Config, bounded: bool,
                   shards: savepoints.ShardLayout | None = None) -> StreamTableEnvironment:
    """Wire source -> parse -> window -> model -> sinks onto ``env``; returns the table env holding the sinks.
    ``shards``: the model shards (:func:`model_shards`; by default one per subtask)."""
    t_env = StreamTableEnvironment.create(env)
    # Kafka -> raw records with event time (per-partition watermarks, read in the JVM) -> canonical
    # records parsed in the JVM; the rest through the exact Python validator (events or dead letters).
    _create_tables(t_env, cfg, bounded)
    classified = _classified_once(t_env)
    t_env.create_temporary_view("fast_events", t_env.sql_query(tables.fast_events_query(cfg, classified)))
    t_env.create_temporary_function("parse_event", parse_event_function(cfg.events, cfg.window.size_ms))
    t_env.create_temporary_view("slow_parsed", t_env.sql_query(tables.slow_parsed_query(classified, "parse_event", PARSED_COLUMNS)))
    _drop_duplicates(t_env, cfg, "slow_parsed")
    _split_late(t_env, cfg, "accepted")

    # -> one row per (model shard, window) with every user's items (JVM windows), plus the dead letters,
    #    in one stream: the only one that crosses into Python.
    #    Each row comes as (shard, row): keyed in the JVM (see _keyed_by_first_field).
    keys, seeds, singleton = shards or model_shards(cfg)
    t_env.create_temporary_view("window_batches", t_env.sql_query(
        tables.window_batches_query(cfg, "on_time", keys, singleton)))
    to_model = t_env.to_append_stream(t_env.sql_query(
        "SELECT shard, ROW(kind, shard, window_end_ms, closed_at, body) FROM ("
        "SELECT 'win' AS kind, shard, window_end_ms, closed_at, quads AS body FROM window_batches "
        "UNION ALL SELECT 'dlq', 0, CAST(NULL AS BIGINT), CAST(NULL AS BIGINT), dead_letter "
        "FROM slow_parsed WHERE dead_letter IS NOT NULL "
        "UNION ALL SELECT 'dlq', 0, CAST(NULL AS BIGINT), CAST(NULL AS BIGINT), payload FROM duplicate_letters "
        "UNION ALL SELECT 'dlq', 0, CAST(NULL AS BIGINT), CAST(NULL AS BIGINT), payload FROM late_letters)"),
        Types.ROW([Types.INT(), INPUT_TYPE]))

    # -> keyed by model shard (one model per subtask, its state in Flink checkpoints): micro-batched
    #    online learning, top-K per active user when the window closes, live-metrics records.
    #    With more than one shard the replicas learn as one model: each one's changes of the shared variables go to
    #    the sync topic, which every replica reads itself before each call (RecommendOnlineSynced, Kafka clients).
    keyed = _keyed_by_first_field(to_model, Types.INT(), INPUT_TYPE)
    if replica_sync_on(cfg, len(keys)):
        subtasks = {key: subtask_of(key, cfg.flink.parallelism, cfg.flink.max_parallelism) for key in keys}
        model_output = keyed.process(RecommendOnlineSynced(cfg, since_ms=int(time.time() * 1000), senders=keys,
                                                           seeds=seeds, subtasks=subtasks), output_type=OUTPUT_TYPE)
    else:
        model_output = keyed.process(RecommendOnline(cfg), output_type=OUTPUT_TYPE)
    model_output = model_output.name("recommend-online").uid("recommend-online")
    t_env.create_temporary_view("model_output", t_env.from_data_stream(model_output))

    # -> Kafka: recommendations keyed by user, live metrics, dead letters as JSON (routed in the JVM).
    sinks = t_env.create_statement_set()
    sinks.add_insert_sql("INSERT INTO recommendations_sink SELECT user_id, payload, "
                         f"{tables.closed_at_header_sql('closed_at')} FROM model_output WHERE kind = 'rec'")
    sinks.add_insert_sql("INSERT INTO metrics_sink SELECT payload FROM model_output WHERE kind = 'metrics'")
    sinks.add_insert_sql("INSERT INTO dead_letter_sink SELECT payload FROM model_output WHERE kind = 'dlq'")
    sinks.attach_as_datastream()
    return t_env


def build_reference_pipeline(env: StreamExecutionEnvironment, cfg: Config, bounded: bool) -> StatementSet:
    """The benchmark's JVM-only reference: the same source, parsing, windows and sinks, no Python, no model.

    Canonical records are parsed exactly as in the job; any other record is dead-lettered as
    ``not_canonical`` (the reference has no Python validator). One list per (user, window): its own items.
    """
    t_env = StreamTableEnvironment.create(env)
    _create_tables(t_env, cfg, bounded)
    t_env.create_temporary_view("fast_events", t_env.sql_query(tables.fast_events_query(cfg, "classified")))
    _split_late(t_env, cfg, "fast_events")
    sinks = t_env.create_statement_set()
    sinks.add_insert_sql("INSERT INTO recommendations_sink SELECT user_id, payload, "
                         f"{tables.closed_at_header_sql('closed_at')} FROM ({tables.reference_lists_query(cfg, 'on_time')})")
    sinks.add_insert_sql("INSERT INTO dead_letter_sink SELECT payload FROM late_letters")
    sinks.add_insert_sql("INSERT INTO dead_letter_sink SELECT "
                         f"{tables.dead_letter_sql(chr(39) + 'not_canonical' + chr(39))} FROM classified WHERE NOT canonical")
    return sinks


def prepare_local_runtime(cfg: Config) -> None:
    """The local runtime's JVM (started by this process) gets the Python worker environment and a bounded
    heap (``flink.local_heap_mb``, unless ``JVM_ARGS`` sets ``-Xmx``); logs go to <home>/logs."""
    os.environ.update(worker_environment())
    jvm_args = os.environ.get("JVM_ARGS", "")
    if cfg.flink.local_heap_mb and "-Xmx" not in jvm_args:   # state sits on the heap (hashmap backend)
        os.environ["JVM_ARGS"] = f"{jvm_args} -Xmx{cfg.flink.local_heap_mb}m".strip()
    log_dir = cfg.local.home_path() / "logs" / "flink-local"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir.resolve()))


def run(cfg: Config, bounded: bool, reference: bool = False, from_savepoint: str | None = None,
        wait: bool = True) -> None:
    """Build and execute the job on the environment Flink gives us (local runtime, or the cluster's).

    ``reference``: the JVM-only benchmark reference instead of the job (``freshet bench``).
    ``from_savepoint``: resume from this savepoint or retained checkpoint (the local runtime; ``flink run``
    takes it as ``-s``). ``wait``: until the job ends (not for ``flink run -d``, which returns at once).
    The job's config is recorded under its id, so that a savepoint of it can be checked before a resume.
    """
    prepare_local_runtime(cfg)
    conf = flink_configuration(cfg)
    if from_savepoint:
        conf.set_string("execution.state-recovery.path", from_savepoint)
    # The local runtime's temporary files (each Flink JVM extracts a 24 MB RPC jar) in a folder of this
    # process, not in /tmp, where a job stopped with SIGTERM left them. (A cluster uses its own setting.)
    conf.set_string("io.tmp.dirs", str(processes.private_tmp_dir(cfg.local.home_path().resolve() / "tmp")))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    if reference:
        build_reference_pipeline(env, cfg, bounded).execute().wait()
        return
    shards = model_shards(cfg, from_savepoint)
    if shards.seeds:
        print(f"{savepoints.RESCALE_NOTICE} {cfg.flink.parallelism} with more model shards than the savepoint's: new shards "
              f"{sorted(shards.seeds)} start from copies of shards {[shards.seeds[k] for k in sorted(shards.seeds)]}",
              file=sys.stderr, flush=True)
    build_pipeline(env, cfg, bounded, shards)
    if not wait:      # `flink run -d`: execute() hands the job to the cluster and returns
        savepoints.record_job(cfg, str(env.execute(JOB_NAME).get_job_id()), bounded, shards)
        return
    client = env.execute_async(JOB_NAME)
    job_id = str(client.get_job_id())
    savepoints.record_job(cfg, job_id, bounded, shards)
    print(f"job {job_id} started", file=sys.stderr, flush=True)
    client.get_job_execution_result().result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The Freshet recommender job (used by `freshet run/submit`).")
    parser.add_argument("--config", type=Path, help="YAML config (default conf/freshet.yaml)")
    parser.add_argument("--bounded", action="store_true", help="stop when the input topic is drained")
    parser.add_argument("--reference", action="store_true",
                        help="run the JVM-only benchmark reference (no Python, no model) instead of the job")
    parser.add_argument("--from-savepoint", metavar="PATH", help="resume from a savepoint or retained checkpoint")
    # Not --detached: `flink run` takes that for its own option even after the module's name.
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the job is submitted (`flink run -d`; the cluster runs it)")
    args = parser.parse_args(argv)
    run(load_config(args.config), args.bounded, args.reference, from_savepoint=args.from_savepoint,
        wait=not args.no_wait)


if __name__ == "__main__":
    main()
