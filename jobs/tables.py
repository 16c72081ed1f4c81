"""SQL text of the job's JVM-side parts: Kafka source and sinks, and the per-user window aggregation.

Kept apart from the wiring so each statement can be read (and tested) on its own.
"""
from __future__ import annotations

from typing import Sequence

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


CLOSED_AT_HEADER = "freshet.window_closed_at"


def closed_at_header_sql(closed_at: str) -> str:
    """Kafka headers of a recommendation: when its window closed (epoch ms, decimal text), for freshness."""
    return f"MAP[{_quote(CLOSED_AT_HEADER)}, CAST(CAST({closed_at} AS STRING) AS BYTES)]"


def recommendations_sink_ddl(cfg: Config, name: str) -> str:
    """Key = user_id, value = the recommendation JSON (CONTRACTS §2); header ``freshet.window_closed_at``."""
    options = {**_sink_options(cfg, cfg.kafka.output_topic, "recs"),
               "key.format": "raw", "key.fields": "user_id",
               "value.format": "raw", "value.fields-include": "EXCEPT_KEY"}
    return f"""CREATE TEMPORARY TABLE {name} (
  `user_id` STRING,
  `payload` STRING,
  `headers` MAP<STRING, BYTES> METADATA
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


# An id that needs no JSON escapes: printable ASCII without '"' and '\' (as many bytes as chars), or any
# characters but '"', '\', controls and U+FFFD (what Java decodes invalid UTF-8 to), at most 4 bytes each.
_ASCII_ID = r'[ !#-\[\]-~]{1,%d}'
_UNICODE_ID = r'[^"\\\x00-\x1f\uFFFD]{1,%d}'
_WS = "[ \\t\\n\\r]*"


def canonical_event_pattern(cfg: Config) -> str:
    """A Java regex for the canonical encoding of an event (what ``freshet replay`` and most producers write).

    ``{"user_id": "u1", "item_id": "i9", "behavior": "view", "ts": 1700000000000[, "value": 4.0]}``: keys
    in this order, string ids without escapes (any length up to ``max_id_bytes`` in printable ASCII, up
    to a quarter of it otherwise), a non-negative integer ``ts``, a plain decimal ``value`` and no
    ``event_id``. A record that matches is a valid event by every rule of CONTRACTS §1 except the
    ``ts`` horizon, which the query checks; groups: 1 user, 2 item, 3 behaviour, 4 ts, 5 value.
    Everything else (other key orders, escapes, event ids, ...) takes the exact Python validator.
    """
    max_bytes = cfg.events.max_id_bytes
    ident = f'"({_ASCII_ID % max_bytes}|{_UNICODE_ID % (max_bytes // 4)})"' if max_bytes >= 4 else \
        f'"({_ASCII_ID % max_bytes})"'

    behaviors = "|".join(b for b in cfg.events.behaviors if b.replace("_", "").replace("-", "").isalnum())
    field = lambda name: f'{_WS}"{name}"{_WS}:{_WS}'   # noqa: E731
    return ("^\\{" + field("user_id") + ident + _WS + "," + field("item_id") + ident + _WS + ","
            + field("behavior") + f'"({behaviors})"' + _WS + "," + field("ts") + "(0|[1-9][0-9]{0,15})"
            + "(?:" + _WS + "," + field("value") + "(-?(?:0|[1-9][0-9]{0,15})(?:\\.[0-9]{1,17})?))?"
            + _WS + "\\}$")


def now_ms_sql() -> str:
    """Processing time in epoch ms (CURRENT_TIMESTAMP is evaluated once per record)."""
    return "(EXTRACT(EPOCH FROM CURRENT_TIMESTAMP) * 1000 + EXTRACT(MILLISECOND FROM CURRENT_TIMESTAMP))"


def weight_sql(cfg: Config, behavior: str, value: str) -> str:
    """The positive-signal weight of an event, as ``EventValidator.weight`` computes it."""
    cases = " ".join(f"WHEN {_quote(b)} THEN CAST({float(cfg.events.weights[b])!r} AS DOUBLE)"
                     for b in cfg.events.behaviors)
    return (f"CASE WHEN {behavior} = 'rate' AND {value} < {float(cfg.events.rate_min_value)!r} THEN CAST(0.0 AS DOUBLE) "
            f"ELSE CASE {behavior} {cases} END END")


def canonical_fields_sql(text: str) -> dict[str, str]:
    """SQL for the fields of a record already known to be canonical: split on '"' (ids cannot contain
    one), no regex groups (REGEXP_EXTRACT compiles its pattern again and again: it dominated a profile).

    Pieces: 3 user, 7 item, 11 behaviour, 14 ``: <ts>, `` or ``: <ts>}``, 16 ``: <value>}``.
    """
    piece = lambda j: f"SPLIT_INDEX({text}, '\"', {j})"   # noqa: E731
    return {"user_id": piece(3), "item_id": piece(7), "behavior": piece(11),
            "ts": f"CAST(REGEXP_REPLACE({piece(14)}, '[^0-9]', '') AS BIGINT)",
            "value": f"CAST(REGEXP_REPLACE({piece(16)}, '[^-0-9.]', '') AS DOUBLE)"}


def classified_query(cfg: Config, raw: str) -> str:
    """Raw records plus ``canonical``: true when the JVM can accept the record without Python.

    A UTF-8 character takes at most 4 bytes, so a record of at most ``max_message_bytes / 4`` characters
    is within the byte limit (canonical records are far shorter; longer ones take the exact Python check).
    """
    pattern = _quote(canonical_event_pattern(cfg))
    limit = f"CAST(UNIX_TIMESTAMP() AS BIGINT) * 1000 + {cfg.events.max_future_ms}"
    text = "CAST(`value` AS STRING)"
    return f"""
SELECT `value`, `topic`, `partition`, `offset`, rowtime, {text} AS text,
       COALESCE(CHAR_LENGTH({text}) <= {cfg.events.max_message_bytes // 4} AND REGEXP({text}, {pattern})
                AND {canonical_fields_sql(text)["ts"]} <= {limit}, FALSE) AS canonical
FROM {raw}"""


def fast_events_query(cfg: Config, classified: str) -> str:
    """Canonical records parsed in the JVM: the same columns as the Python validator's accepted events."""
    f = canonical_fields_sql("text")
    return f"""
SELECT {f["user_id"]} AS user_id, {f["item_id"]} AS item_id, {f["ts"]} AS ts,
       {weight_sql(cfg, f["behavior"], f["value"])} AS weight,
       `value`, `topic`, `partition`, `offset`, rowtime
FROM {classified} WHERE canonical"""


def slow_parsed_query(classified: str, parse_fn: str, names: list[str]) -> str:
    """Every other record through the exact Python validator (a table function: an event or a dead letter)."""
    return f"""
SELECT p.user_id, p.item_id, p.ts, p.weight, p.event_id, p.dead_letter,
       c.`value`, c.`topic`, c.`partition`, c.`offset`, c.rowtime, c.proc
FROM {classified} AS c, LATERAL TABLE({parse_fn}(c.`value`, c.`topic`, c.`partition`, c.`offset`)) AS p({", ".join(names)})
WHERE NOT c.canonical"""


def copies_query(parsed: str) -> str:
    """Accepted events that carry an ``event_id``, each with ``copies``: how many records of its id arrived
    so far, itself included (1: the first; more: a duplicate).

    An unbounded OVER aggregation partitioned by ``event_id`` in processing-time order: Flink state keyed by
    the id, so a duplicate is caught whatever partition or subtask each copy arrives on, at any parallelism,
    and after a restore (the counts are in checkpoints and savepoints). The job sets the state's time to live
    (``table.exec.state.ttl``) to ``events.dedup_horizon_ms``: an id is forgotten once no copy of it has
    arrived for that long in processing time (at replay speed, a whole log fits into one horizon).
    """
    return f"""
SELECT *, COUNT(*) OVER (PARTITION BY event_id ORDER BY proc ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS copies
FROM {parsed} WHERE dead_letter IS NULL AND event_id IS NOT NULL"""


def window_end_sql(cfg: Config, ts: str) -> str:
    size = cfg.window.size_ms
    return f"({ts} - MOD({ts}, {size}) + {size})"


def late_sql(cfg: Config, ts: str) -> str:
    """True once the watermark has reached the last millisecond of the event's window (it has fired)."""
    return f"(TO_TIMESTAMP_LTZ({window_end_sql(cfg, ts)} - 1, 3) <= CURRENT_WATERMARK(rowtime))"


def dead_letter_sql(reason: str) -> str:
    """A dead letter (CONTRACTS §1) built in the JVM, for records that are valid UTF-8."""
    return (f"JSON_OBJECT('reason' VALUE {reason}, 'raw' VALUE CAST(`value` AS STRING), 'topic' VALUE `topic`, "
            f"'partition' VALUE `partition`, 'offset' VALUE `offset`)")


def late_reason_sql(cfg: Config) -> str:
    return ("CONCAT('late: ts ', CAST(ts AS STRING), ' is behind the watermark: its window (end ', "
            f"CAST({window_end_sql(cfg, 'ts')} AS STRING), ') has closed')")


def shard_sql(user: str, keys: Sequence[int], singleton: bool = False) -> str:
    """Which model shard a user's increments go to: ``keys[hash(user) mod len(keys)]``, stable across runs
    (Java's String.hashCode). ``keys``: one key per shard, chosen to land on distinct subtasks.

    One shard is an expression of the user too (always the key), not the constant, and of the same type as
    the CASE of several (INT NOT NULL: a key type differs at restore otherwise). Grouped by a constant, the planner runs the per-shard window stage as a singleton task (max parallelism 1), whose
    state cannot be restored at a higher parallelism. ``singleton``: the constant, as Freshet wrote it before
    rescaling (its p = 1 savepoints hold that plan's state and resume only into it).

    >>> shard_sql("u", [0])
    'COALESCE(CAST(MOD(ABS(MOD(HASH_CODE(u), 1048576)), 1) AS INT), 0) + 0'
    >>> shard_sql("u", [0], singleton=True)
    '0'
    >>> shard_sql("u", [0, 5])
    'CASE CAST(MOD(ABS(MOD(HASH_CODE(u), 1048576)), 2) AS INT) WHEN 0 THEN 0 ELSE 5 END'
    """
    which = f"CAST(MOD(ABS(MOD(HASH_CODE({user}), 1048576)), {len(keys)}) AS INT)"
    if len(keys) == 1:
        return str(int(keys[0])) if singleton else f"COALESCE({which}, 0) + {int(keys[0])}"
    cases = " ".join(f"WHEN {j} THEN {int(k)}" for j, k in enumerate(keys[:-1]))
    return f"CASE {which} {cases} ELSE {int(keys[-1])} END"


def window_batches_query(cfg: Config, events: str, shard_keys: Sequence[int], singleton: bool = False) -> str:
    """Per (model shard, window): every user's items with summed weights and counts, in one row. ``shard_keys``:
    the key of each shard; ``singleton``: one shard as a constant (:func:`shard_sql`).

    ``quads`` is ``[[user, item, weight, count], ...]`` as JSON text. The inner window aggregation sums per
    (user, item); the outer one, a cascaded window over the same tumbling window, folds a whole window of
    a shard into one record, so the JVM -> Python boundary is crossed once per window and shard, not once
    per event. ``closed_at`` is when the window fired (processing time, ms) for latency measurements.
    """
    size_ms = cfg.window.size_ms
    size = interval(size_ms)
    return f"""
WITH per_item AS (
  SELECT user_id, item_id, window_time AS item_time,
         SUM(weight) AS weight, COUNT(*) AS cnt, MAX(ts) AS max_ts
  FROM TABLE(TUMBLE(TABLE {events}, DESCRIPTOR(rowtime), {size}))
  GROUP BY user_id, item_id, window_start, window_end, window_time
)
SELECT {shard_sql('user_id', shard_keys, singleton)} AS shard,
       MAX(max_ts) - MOD(MAX(max_ts), {size_ms}) + {size_ms} AS window_end_ms,
       {now_ms_sql()} AS closed_at,
       JSON_ARRAYAGG(JSON_ARRAY(user_id, item_id, weight, cnt)) AS quads
FROM TABLE(TUMBLE(TABLE per_item, DESCRIPTOR(item_time), {size}))
GROUP BY {shard_sql('user_id', shard_keys, singleton)}, window_start, window_end
"""


def reference_lists_query(cfg: Config, events: str) -> str:
    """The JVM-only benchmark reference: per (user, window), the window's items and weights (no model).

    Same source, parsing, windowing and sink as the job, so its speed is the engine's ceiling here.
    """
    size = interval(cfg.window.size_ms)
    size_ms = cfg.window.size_ms
    return f"""
WITH per_item AS (
  SELECT user_id, item_id, window_time AS item_time, SUM(weight) AS weight, MAX(ts) AS max_ts
  FROM TABLE(TUMBLE(TABLE {events}, DESCRIPTOR(rowtime), {size}))
  GROUP BY user_id, item_id, window_start, window_end, window_time
)
SELECT user_id, {now_ms_sql()} AS closed_at,
       JSON_OBJECT('user_id' VALUE user_id, 'items' VALUE JSON_ARRAYAGG(item_id), 'scores' VALUE JSON_ARRAYAGG(weight),
                   'window_end' VALUE MAX(max_ts) - MOD(MAX(max_ts), {size_ms}) + {size_ms}, 'model_version' VALUE 0,
                   'emitted_at' VALUE {now_ms_sql()}) AS payload
FROM TABLE(TUMBLE(TABLE per_item, DESCRIPTOR(item_time), {size}))
GROUP BY user_id, window_start, window_end
"""
