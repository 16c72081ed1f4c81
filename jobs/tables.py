"""SQL text of the job's JVM-side parts: Kafka source and sinks, and the per-user window aggregation.

Kept apart from the wiring so each statement can be read (and tested) on its own.
"""
from __future__ import annotations

from freshet.conf.settings import Config


def _quote(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def _with(options: dict[str, str]) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())


def _client_options(cfg: Config) -> dict[str, str]:
    return {f"properties.{k}": v for k, v in cfg.kafka.client_properties().items()}


def interval(ms: int) -> str:
    """A SQL interval literal for ``ms`` milliseconds (precise to the millisecond, below 100 days).

    >>> interval(90061005)
    "INTERVAL '1 01:01:01.005' DAY TO SECOND(3)"
    """
    if not 0 <= ms < 100 * 86400000:
        raise ValueError(f"interval of {ms} ms is outside [0, 100 days)")
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' DAY TO SECOND(3)"


def raw_source_ddl(cfg: Config, name: str, bounded: bool) -> str:
    """Kafka records as raw bytes plus where they came from (for dead letters), with event time.

    The watermark is generated here, in the Kafka source, per partition (and idle partitions are
    skipped after ``table.exec.source.idle-timeout``), from the ``ts`` field read in the JVM. A record
    whose ``ts`` is missing, negative or too far in the future counts as time 0, so it cannot push
    the watermark (and make good events late); it is dead-lettered downstream anyway.
    """
    ts = "TRY_CAST(JSON_VALUE(CAST(`value` AS STRING), '$.ts') AS BIGINT)"
    limit = f"CAST(UNIX_TIMESTAMP() AS BIGINT) * 1000 + {cfg.events.max_future_ms}"
    options = {
        "connector": "kafka",
        "topic": cfg.kafka.input_topic,
        **_client_options(cfg),
        "properties.group.id": cfg.kafka.group_id,
        "properties.auto.offset.reset": "earliest",
        "properties.isolation.level": "read_committed",
        "scan.startup.mode": cfg.kafka.startup_mode,
        "value.format": "raw",
    }
    if bounded:
        options["scan.bounded.mode"] = "latest-offset"
    return f"""CREATE TEMPORARY TABLE {name} (
  `value` BYTES,
  `topic` STRING METADATA VIRTUAL,
  `partition` INT METADATA VIRTUAL,
  `offset` BIGINT METADATA VIRTUAL,
  `rowtime` AS TO_TIMESTAMP_LTZ(CASE WHEN {ts} BETWEEN 0 AND {limit} THEN {ts} ELSE 0 END, 3),
  WATERMARK FOR `rowtime` AS `rowtime` - {interval(cfg.window.out_of_orderness_ms)}
) WITH (
  {_with(options)}
)"""


def _sink_options(cfg: Config, topic: str, suffix: str) -> dict[str, str]:
    guarantee = cfg.flink.delivery_guarantee
    options = {"connector": "kafka", "topic": topic, **_client_options(cfg),
               "sink.delivery-guarantee": guarantee}
    if guarantee == "exactly-once":
        options["sink.transactional-id-prefix"] = f"{cfg.flink.transactional_id_prefix}-{suffix}"
        options["properties.transaction.timeout.ms"] = str(cfg.kafka.transaction_timeout_ms)
    return options


def recommendations_sink_ddl(cfg: Config, name: str) -> str:
    """Key = user_id, value = the recommendation JSON (CONTRACTS §2)."""
    options = {**_sink_options(cfg, cfg.kafka.output_topic, "recs"),
               "key.format": "raw", "key.fields": "user_id",
               "value.format": "raw", "value.fields-include": "EXCEPT_KEY"}
    return f"""CREATE TEMPORARY TABLE {name} (
  `user_id` STRING,
  `payload` STRING
) WITH (
  {_with(options)}
)"""


def json_sink_ddl(cfg: Config, name: str, topic: str, suffix: str) -> str:
    """A topic of JSON values without keys (dead letters, live metrics)."""
    options = {**_sink_options(cfg, topic, suffix), "value.format": "raw"}
    return f"""CREATE TEMPORARY TABLE {name} (
  `payload` STRING
) WITH (
  {_with(options)}
)"""


def increments_query(cfg: Config, events_view: str) -> str:
    """Per (user, window): the items with summed weights and event counts, as ``[[item, weight, count], ...]``.

    The inner window aggregation sums per (user, item); the outer one, a cascaded window over the
    same tumbling window, folds those rows into one increment per user. Both run in the JVM; the items
    cross into Python as one JSON string (PyFlink cannot type ARRAY columns on a keyed Python stream).
    """
    size_ms = cfg.window.size_ms
    size = interval(size_ms)
    return f"""
WITH per_item AS (
  SELECT user_id, item_id, window_time AS item_time,
         SUM(weight) AS weight, COUNT(*) AS cnt, MAX(ts) AS max_ts
  FROM TABLE(TUMBLE(TABLE {events_view}, DESCRIPTOR(rowtime), {size}))
  GROUP BY user_id, item_id, window_start, window_end, window_time
)
SELECT user_id,
       MAX(max_ts) - MOD(MAX(max_ts), {size_ms}) + {size_ms} AS window_end_ms,
       JSON_ARRAYAGG(JSON_ARRAY(item_id, weight, cnt)) AS items
FROM TABLE(TUMBLE(TABLE per_item, DESCRIPTOR(item_time), {size}))
GROUP BY user_id, window_start, window_end
"""
