"""Kafka client helpers shared by the commands and tests: topics, producing, reading topics to the end."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from freshet.conf.settings import Config


def admin(cfg: Config) -> AdminClient:
    return AdminClient(cfg.kafka.client_properties())


class BrokerUnreachable(RuntimeError):
    """No Kafka broker answered at the configured address."""


def topic_names(cfg: Config, timeout: float = 10.0) -> set[str]:
    """The broker's topics; :class:`BrokerUnreachable` (one line saying what to do) when none answers."""
    quiet = AdminClient({**cfg.kafka.client_properties(), "log_level": 0})   # the error below says it all
    try:
        return set(quiet.list_topics(timeout=timeout).topics)
    except KafkaException:
        raise BrokerUnreachable(f"no Kafka broker answered at {cfg.kafka.bootstrap_servers} within {timeout:.0f}s; "
                                "start the local one with `freshet kafka start` or set kafka.bootstrap_servers") from None


# The sync topic (parallelism > 1) carries each replica's changes of the shared model, up to tens of MB
# each on large catalogues; they are read within seconds, and a restore rereads at most one checkpoint's
# worth, so a day of retention (by the records' wall-clock timestamps) is plenty.
SYNC_TOPIC = {"max.message.bytes": str(64 << 20), "retention.ms": str(86_400_000)}


def ensure_topics(cfg: Config, timeout: float = 60.0, topic_config: dict[str, dict[str, str]] | None = None,
                  names: list[str] | None = None) -> list[str]:
    """Create the job's topics (input, output, dead letters, metrics; or ``names``) if missing, all with
    ``kafka.partitions`` partitions and no time-based retention; returns the names created.

    Retries until every topic exists with partition leaders: right after a delete, Kafka may still
    answer "already exists" for a topic that is about to disappear. ``topic_config``: extra topic
    settings by name (e.g. LogAppendTime timestamps for the benchmark's output topics).
    """
    topic_names(cfg)      # fail fast, in one line, when there is no broker
    client = admin(cfg)
    wanted = list(names) if names is not None else cfg.kafka.topics()
    created: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        meta = client.list_topics(timeout=timeout).topics
        missing = [t for t in wanted if t not in meta]
        if not missing and _have_leaders(meta, wanted):
            return created
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {missing or wanted} are not ready on {cfg.kafka.bootstrap_servers} "
                               f"after {timeout:.0f}s")
        if missing:
            # retention.ms=-1: replays carry historical timestamps, which time-based retention would
            # delete at the broker's next check (it compares record timestamps with now).
            futures = client.create_topics([NewTopic(t, num_partitions=cfg.kafka.partitions, replication_factor=1,
                                                     config={"retention.ms": "-1",
                                                             **(SYNC_TOPIC if t == cfg.kafka.sync_topic else {}),
                                                             **(topic_config or {}).get(t, {})})
                                            for t in missing])
            for topic, fut in futures.items():
                try:
                    fut.result(timeout)
                    created.append(topic)
                except KafkaException as e:
                    if "TOPIC_ALREADY_EXISTS" not in str(e):
                        raise
        time.sleep(0.3)


def _have_leaders(meta, topics: list[str]) -> bool:
    return all(meta[t].error is None and meta[t].partitions
               and all(p.leader >= 0 and p.error is None for p in meta[t].partitions.values()) for t in topics)


def delete_topics(cfg: Config, topics: list[str], timeout: float = 30.0) -> None:
    client = admin(cfg)
    existing = set(client.list_topics(timeout=timeout).topics)
    doomed = [t for t in topics if t in existing]
    if doomed:
        for fut in client.delete_topics(doomed, operation_timeout=timeout).values():
            fut.result(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and set(doomed) & set(client.list_topics(timeout=timeout).topics):
            time.sleep(0.2)


def producer(cfg: Config, **extra) -> Producer:
    props = {**cfg.kafka.client_properties(), "linger.ms": 20, "batch.num.messages": 10000,
             "queue.buffering.max.messages": 500000, "compression.type": "lz4",
             "enable.idempotence": True, **extra}
    return Producer(props)


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int
    headers: tuple = ()     # ((name, bytes), ...)


def read_topic(cfg: Config, topic: str, *, read_committed: bool = True,
               idle_timeout: float = 60.0, follow: bool = False, from_beginning: bool = True,
               group_id: str | None = None) -> Iterator[Message]:
    """Yield a topic's records. Unless ``follow``, stop once every partition is read to its end.

    With ``read_committed`` (the default) only records of committed transactions are returned, as the
    exactly-once contract requires of readers. A read that makes no progress for ``idle_timeout``
    seconds before reaching the end raises :class:`TopicNotDrained` (an open transaction holds the
    last stable offset back, for instance) instead of returning a silently partial result.
    """
    props = {**cfg.kafka.client_properties(),
             "group.id": group_id or f"freshet-reader-{time.time_ns()}",
             "enable.auto.commit": group_id is not None,
             "auto.offset.reset": "earliest" if from_beginning else "latest",
             "isolation.level": "read_committed" if read_committed else "read_uncommitted",
             "enable.partition.eof": True}
    consumer = Consumer(props)
    try:
        meta = consumer.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            raise RuntimeError(f"topic {topic!r} does not exist on {cfg.kafka.bootstrap_servers}")
        partitions = list(meta.topics[topic].partitions)
        if group_id is None:
            offset = -2 if from_beginning else -1  # OFFSET_BEGINNING / OFFSET_END
            consumer.assign([TopicPartition(topic, p, offset) for p in partitions])
        else:
            consumer.subscribe([topic])
        at_end: set[int] = set()
        position: dict[int, int] = {}
        progress = time.monotonic()
        while True:
            msg = consumer.poll(0.5)
            if msg is None:
                if not follow and len(at_end) == len(partitions):
                    return
                if not follow and time.monotonic() - progress > idle_timeout:
                    raise TopicNotDrained(topic, {p: position.get(p, 0) for p in partitions},
                                          {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                                                             cached=False)[1] for p in partitions})
                continue
            if msg.error():
                if msg.error().code() == -191:  # _PARTITION_EOF
                    # read_committed reports EOF at the last stable offset; a just-committed transaction's
                    # markers land asynchronously, so only the high watermark means "read everything".
                    _, high = consumer.get_watermark_offsets(TopicPartition(topic, msg.partition()), timeout=10,
                                                             cached=False)
                    position[msg.partition()] = msg.offset()
                    if msg.offset() >= high:
                        at_end.add(msg.partition())
                        progress = time.monotonic()
                    continue
                raise KafkaException(msg.error())
            at_end.discard(msg.partition())
            position[msg.partition()] = msg.offset() + 1
            progress = time.monotonic()
            yield Message(msg.key(), msg.value(), msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1],
                          tuple(msg.headers() or ()))
    finally:
        consumer.close()


class TopicNotDrained(RuntimeError):
    """A non-following read stalled before the end of its topic."""

    def __init__(self, topic: str, position: dict[int, int], high: dict[int, int]):
        self.topic, self.position, self.high = topic, position, high
        lag = {p: high[p] - position[p] for p in high if high[p] > position[p]}
        super().__init__(f"reading {topic!r} stalled before its end (partition: records behind the high watermark "
                         f"{lag}); a read_committed reader cannot pass an open transaction: is a job still "
                         f"writing, or did a producer die mid-transaction (it is aborted after the "
                         f"transaction timeout)?")


def read_json(cfg: Config, topic: str, **kwargs) -> list[dict]:
    """All records of ``topic`` as parsed JSON (values that are not JSON raise)."""
    return [json.loads(m.value) for m in read_topic(cfg, topic, **kwargs)]


def end_offsets(cfg: Config, topic: str) -> dict[int, int]:
    consumer = Consumer({**cfg.kafka.client_properties(), "group.id": "freshet-offsets"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        out = {}
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = high
        return out
    finally:
        consumer.close()


class DeliveryReport:
    """Counts acknowledged and failed deliveries (pass as ``on_delivery``); nothing is lost silently."""

    def __init__(self):
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            self.first_error = self.first_error or str(err)


def flush_or_fail(prod: Producer, report: DeliveryReport | None = None, timeout: float = 120.0) -> None:
    """Wait for every queued record; raise if any is unacknowledged or failed."""
    remaining = prod.flush(timeout)
    if remaining:
        raise RuntimeError(f"{remaining} records were not acknowledged by the broker within {timeout:.0f}s")
    if report is not None and report.failed:
        raise RuntimeError(f"{report.failed} records failed to reach Kafka (first error: {report.first_error})")
