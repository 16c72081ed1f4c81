"""The ``freshet`` command: thin entry points that parse arguments, load config and call one function."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from freshet.conf.settings import Config, ConfigError, load_config


def _config(args) -> Config:
    cfg = load_config(args.config)
    if getattr(args, "bootstrap", None):
        cfg = cfg.replace(kafka={"bootstrap_servers": args.bootstrap})
    return cfg


def _service(service, action: str) -> int:
    """start | stop | status of a local service (Kafka broker, Flink cluster); status exits 3 when down."""
    if action == "status":
        status = service.status()
        print(status)
        return 0 if status.running else 3
    getattr(service, action)()
    return 0


def cmd_kafka(args) -> int:
    from freshet.ops.kafka_local import LocalKafka
    return _service(LocalKafka(_config(args)), args.action)


def cmd_cluster(args) -> int:
    from freshet.ops.flink_cluster import LocalFlinkCluster
    return _service(LocalFlinkCluster(_config(args)), args.action)


def cmd_submit(args) -> int:
    from freshet.ops import kafka_io
    from freshet.ops.flink_cluster import LocalFlinkCluster
    cfg = _config(args)
    cluster = LocalFlinkCluster(cfg)
    if not cluster.status().reachable:
        raise RuntimeError(f"no Flink cluster at {cluster.url}; start one with `freshet cluster start`")
    if args.from_savepoint:
        from freshet.ops import savepoints
        savepoints.check_resume(cfg, args.from_savepoint, args.bounded)
    kafka_io.ensure_topics(cfg)
    job_id = cluster.submit(args.config, args.bounded, from_savepoint=args.from_savepoint)
    print(job_id)
    if args.wait:
        state = cluster.wait(job_id, timeout=args.wait)
        print(f"job {job_id}: {state}", file=sys.stderr)
        return 0 if state == "FINISHED" else 1
    return 0


def cmd_stop(args) -> int:
    from freshet.ops.flink_cluster import LocalFlinkCluster
    cfg = _config(args)
    cluster = LocalFlinkCluster(cfg)
    started = time.monotonic()
    location = cluster.stop_job(args.job_id, args.savepoint_dir, timeout=args.timeout,
                                log=lambda line: print(line, file=sys.stderr), drain=args.drain)
    print(f"savepoint complete in {time.monotonic() - started:.1f}s; resume with "
          f"`freshet submit --from-savepoint {location}`", file=sys.stderr)
    print(location)
    return 0


def cmd_topics(args) -> int:
    from freshet.ops import kafka_io
    cfg = _config(args)
    topics = cfg.kafka.topics()
    if args.action == "reset":
        kafka_io.delete_topics(cfg, topics)
        kafka_io.ensure_topics(cfg)
        print(f"reset topics: {', '.join(topics)}")
    else:
        from freshet.ops.runner import topic_count
        kafka_io.ensure_topics(cfg)
        for t in topics:
            print(f"{t}: {topic_count(cfg, t)} records")
    return 0


def cmd_data(args) -> int:
    from freshet.ops import vendor
    cfg = _config(args)
    print(vendor.ensure_dataset(cfg.local.home_path(), args.dataset).resolve())
    return 0


def cmd_replay(args) -> int:
    from freshet.ops import replay
    cfg = _config(args)
    df = replay.load_log(args.input, args.format)
    speed = None if args.speed == "max" else float(args.speed)
    if speed is not None and speed <= 0:
        raise ConfigError("--speed must be 'max' or a positive number")
    print(replay.replay(cfg, df, topic=args.topic, speed=speed, progress=not args.quiet))
    return 0


def cmd_run(args) -> int:
    from freshet.ops.runner import run_job
    run_job(_config(args), bounded=args.bounded, from_savepoint=args.from_savepoint)
    return 0


def cmd_recs(args) -> int:
    from freshet.ops import kafka_io
    cfg = _config(args)
    topic = args.topic or cfg.kafka.output_topic
    shown = 0
    for msg in kafka_io.read_topic(cfg, topic, follow=not args.from_beginning or args.follow,
                                   from_beginning=args.from_beginning):
        if args.user is not None and (msg.key or b"").decode("utf-8", "replace") != args.user:
            continue
        print(msg.value.decode("utf-8", "replace"), flush=True)
        shown += 1
        if args.max and shown >= args.max:
            break
    return 0


def cmd_eval(args) -> int:
    from freshet.models.evaluation import evaluate
    from freshet.ops import kafka_io, replay
    cfg = _config(args)
    df = replay.load_log(args.events, args.format)
    if args.recs_file:
        recs = [json.loads(line) for line in Path(args.recs_file).read_text().splitlines() if line.strip()]
    else:
        recs = kafka_io.read_json(cfg, args.recs_topic or cfg.kafka.output_topic)
    ks = sorted({args.k, 2 * args.k})
    result = evaluate(zip(df["user_id"], df["item_id"], df["ts"]), recs, ks=ks)
    o = result.overall
    print(f"events {o['events']:,}  lists {len(recs):,}  coverage {o['coverage']:.1%}")
    print("  ".join(f"{m} {o[m]:.4f}" for m in o if "@" in m))
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_json(), indent=2))
        print(f"written to {args.out}")
    return 0


def cmd_compare(args) -> int:
    from freshet.ops.compare import compare
    compare(_config(args), args.dataset, [s.strip() for s in args.systems.split(",") if s.strip()], args.out_dir)
    return 0


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_bench(args) -> int:
    if args.parallelism:
        from freshet.ops.sweep import sweep
        try:
            parallelisms = [int(x) for x in _names(args.parallelism)]
        except ValueError:
            print(f"--parallelism takes whole numbers, e.g. 1,2,4 (got {args.parallelism!r})", file=sys.stderr)
            return 2
        sweep(_config(args), args.dataset, parallelisms, args.out_dir, events=args.events)
        return 0
    from freshet.ops.bench import bench
    bench(_config(args), args.dataset, _names(args.systems), args.out_dir, events=args.events,
          paced_rate=args.paced_rate, paced_seconds=args.paced_seconds, paced_systems=_names(args.paced_systems),
          paced_warmup_s=args.paced_warmup_s,
          scales=[int(x) for x in _names(args.scale)])
    return 0


def cmd_tune(args) -> int:
    from freshet.ops import replay, tune, vendor
    cfg = _config(args)
    df = replay.load_log(vendor.ensure_dataset(cfg.local.home_path(), args.dataset), "movielens")
    tune.tune(cfg, df, tune.parse_grid(args.grid), args.out)
    return 0


def cmd_demo(args) -> int:
    from freshet.ops.runner import demo
    demo(_config(args), dataset=args.dataset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freshet",
        description="Freshet: real-time recommendations from user-behaviour events "
                    "(Kafka -> PyFlink windows -> online TensorFlow model -> Kafka).",
        epilog="Every command reads conf/freshet.yaml (or --config FILE); any key can be overridden with an "
               "environment variable FRESHET_<SECTION>__<KEY>, e.g. FRESHET_KAFKA__BOOTSTRAP_SERVERS=host:9092.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, help="YAML config file (default: conf/freshet.yaml)")
        p.set_defaults(func=func)
        return p

    p = add("kafka", cmd_kafka, "Start, stop or check the local Kafka broker (127.0.0.1; idempotent).")
    p.add_argument("action", choices=["start", "stop", "status"])

    p = add("cluster", cmd_cluster, "Start, stop or check a local standalone Flink cluster (JobManager + "
                                      "TaskManager on 127.0.0.1; web UI on local.flink_rest_port; idempotent).")
    p.add_argument("action", choices=["start", "stop", "status"])

    p = add("submit", cmd_submit, "Submit the job to the running Flink cluster with `flink run`; prints the job id.")
    p.add_argument("--bounded", action="store_true", help="stop once the input topic is drained")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for the job to finish; exit 0 only if it FINISHED")
    p.add_argument("--from-savepoint", metavar="PATH",
                   help="resume from a savepoint (`freshet stop` prints its path) or a retained checkpoint "
                        "(<home>/checkpoints/<job id>/chk-<n>): the same model, the input from the saved offsets; "
                        "a resumed job is unbounded (end it with `freshet stop --drain`). flink.parallelism may "
                        "differ from the savepoint's: lower, its model shards share subtasks; higher (models bpr, "
                        "sequence), new shards start from copies of old ones")

    p = add("stop", cmd_stop, "Stop a cluster job with a savepoint (Flink's stop-with-savepoint); prints the "
                              "savepoint's path on the last line, for `freshet submit --from-savepoint PATH`.")
    p.add_argument("job_id", help="the job id `freshet submit` printed (also in `freshet cluster status`)")
    p.add_argument("--savepoint-dir", type=Path, help="where the savepoint goes (default: <home>/savepoints)")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS", help="how long to wait for the savepoint")
    p.add_argument("--drain", action="store_true", help="end of input first: every open window is closed and "
                   "listed before the savepoint (for a job that is done; an unbounded job resumed from a "
                   "savepoint stays unbounded, and this is how it ends). When the job's sources have been idle "
                   "(window.idleness_ms), Flink 2.3 would drop the end of input (FLINK-40499): the job is then "
                   "stopped with a savepoint and the job resumed from it is drained, under a new job id")

    p = add("topics", cmd_topics, "Show record counts of, or reset (delete and recreate), the job's topics.")
    p.add_argument("action", choices=["status", "reset"])
    p.add_argument("--bootstrap", help="Kafka bootstrap servers HOST:PORT (default from config)")

    p = add("data", cmd_data, "Fetch a dataset into the git-ignored data folder; prints its .inter path last.")
    p.add_argument("fetch", choices=["fetch"])
    p.add_argument("dataset", choices=["ml-100k", "ml-1m"])

    p = add("replay", cmd_replay, "Produce a log to the input topic in event-time order (Kafka timestamp = ts).")
    p.add_argument("--input", required=True, type=Path, help="log file: events CSV/Parquet or MovieLens .inter")
    p.add_argument("--format", required=True, choices=["events", "movielens"])
    p.add_argument("--topic", help="target topic (default: kafka.input_topic)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers HOST:PORT (default from config)")
    p.add_argument("--speed", default="max", help="'max' (as fast as possible) or N for N x real time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("run", cmd_run, "Run the job on the local Flink runtime.")
    p.add_argument("--bounded", action="store_true", help="stop once the input topic is drained")
    p.add_argument("--from-savepoint", metavar="PATH",
                   help="resume from a savepoint or a retained checkpoint (<home>/checkpoints/<job id>/chk-<n>; "
                        "'latest': the newest one of any earlier run), with its model and input offsets; "
                        "it runs unbounded, until interrupted; at another flink.parallelism too (see `submit`)")

    p = add("recs", cmd_recs, "Print recommendations from the sink topic (read_committed), one JSON per line.")
    p.add_argument("--topic", help="topic (default: kafka.output_topic)")
    p.add_argument("--user", help="only this user's lists")
    p.add_argument("--from-beginning", action="store_true", help="read what is there, then stop (add --follow to keep going)")
    p.add_argument("--follow", action="store_true", help="with --from-beginning: keep waiting for new lists")
    p.add_argument("--max", type=int, default=0, help="stop after this many lists")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers HOST:PORT (default from config)")

    p = add("eval", cmd_eval, "Prequential evaluation (CONTRACTS §3) of recommendations against a log.")
    p.add_argument("--events", required=True, type=Path, help="the replayed log")
    p.add_argument("--format", required=True, choices=["events", "movielens"])
    p.add_argument("--recs-topic", help="topic with the lists (default: kafka.output_topic)")
    p.add_argument("--recs-file", type=Path, help="read lists from a JSON-lines dump instead of Kafka")
    p.add_argument("--k", type=int, default=10, help="cut-off K (HR@K, NDCG@K and @2K are reported)")
    p.add_argument("--out", type=Path, help="write the metrics (overall and per day) as JSON")

    p = add("compare", cmd_compare, "Every model kind vs the baselines, each as its own bounded job through the real "
                                      "pipeline on one replay: HR@10, NDCG@10, HR@20, coverage, events/s, CPU s; "
                                      "JSON, Markdown table and PNG plot of HR@10 per day.")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--systems", default="sequence,bpr,transition,recent-popularity,popularity,frozen",
                   help="comma-separated subset of: sequence (the sequence model), bpr (online matrix factorisation), "
                        "online (whatever model.kind the config sets), transition (counted item-to-item transitions "
                        "+ popularity), recent-popularity (90-day half-life), popularity (cumulative), frozen (the "
                        "configured model, learning the first 20%% of the log only), sync-10min|sync-1h|sync-1d (BPR "
                        "serving parameters synced every 10 min / 1 h / 1 day of event time)")
    p.add_argument("--out-dir", type=Path, default=Path("docs/results"), help="where the reports go")

    p = add("bench", cmd_bench, "Benchmark on the real pipeline (Kafka -> Flink -> Kafka): the job next to a "
                                  "JVM-only reference and a no-op scorer, in one run; events/s, lists/s, CPU, peak "
                                  "RSS, window-close -> list-written latency; JSON and Markdown reports.")
    p.add_argument("--dataset", default="ml-1m", choices=["ml-100k", "ml-1m"])
    p.add_argument("--events", type=int, help="use only the first N events of the log (quick runs)")
    p.add_argument("--systems", default="reference,echo,full",
                   help="comma-separated subset of: reference (JVM only, no Python), echo (the job with a no-op "
                        "scorer), full (the job)")
    p.add_argument("--paced-rate", type=float, default=5000.0,
                   help="events/s of the paced run (latency under steady load); 0 skips it")
    p.add_argument("--paced-seconds", type=float, default=60.0, help="length of each paced replay's measured part")
    p.add_argument("--paced-warmup-s", type=float, default=30.0,
                   help="seconds of paced load before the measured part (JIT warm-up; shown per 10 s, not in the percentiles)")
    p.add_argument("--paced-systems", default="reference,full", help="systems that get a paced run")
    p.add_argument("--scale", default="10,100",
                   help="comma-separated user multipliers for the scaling runs of the full job ('' skips them)")
    p.add_argument("--parallelism", metavar="P1,P2,...",
                   help="instead: the parallelism sweep, e.g. 1,2,4: the job (model.kind) at each p on a standalone "
                        "cluster of p one-slot TaskManagers (REST port 18071): HR@10, events/s, CPU per 1k events, "
                        "model-call time per subtask, sync bytes/s and lag, peak RSS per TaskManager, and what a "
                        "core per subtask projects; writes bench-<dataset>-sweep.json/.md")
    p.add_argument("--out-dir", type=Path, default=Path("docs/results"), help="where bench-<dataset>.json/.md go")

    p = add("tune", cmd_tune, "Grid search of model settings on a MovieLens log with the model alone (same "
                                "increments and order as the job); one JSON line of HR@10 per setting.")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="model keys (and window_ms), e.g. learning_rate=0.2,0.8 negatives=8,32, or for another kind "
                        "kind=sequence sequence_learning_rate=0.05,0.1 (text values are kept as text); "
                        "replicas=2 sync_every_events=0,1000 simulates a parallel model and its sync")
    p.add_argument("--out", type=Path, help="write all rows as JSON")

    p = add("demo", cmd_demo, "Start Kafka, replay MovieLens, run the job bounded, print recommendations and a summary.")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"freshet: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clear one-line error; the traceback only with FRESHET_DEBUG=1
        import os
        if os.environ.get("FRESHET_DEBUG"):
            raise
        print(f"freshet {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
