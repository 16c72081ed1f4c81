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


class SyncFeed:
    """The model replicas' sync records as one replica reads them (parallelism > 1): straight from
    ``kafka.sync_topic``, ``read_uncommitted``, beside Flink's inputs.

    The replica polls it before each model call, so another replica's delta is there milliseconds after it
    was sent, whatever backlog the operator's Flink input holds. (Read back as a second Flink input, the same
    records reached the model operator 11-31 s late in a replay: docs/ARCHITECTURE.md.) Where it reads is
    the replica's to keep: :meth:`positions` go into its snapshot and :meth:`start` resumes from them; a
    fresh start reads from ``since_ms`` (Kafka timestamps), the time the job was built.
    """

    def __init__(self, cfg: Config, since_ms: int):
        self.topic, self.since_ms, self.servers = cfg.kafka.sync_topic, int(since_ms), cfg.kafka.bootstrap_servers
        self.consumer = Consumer({**cfg.kafka.client_properties(), "group.id": f"{cfg.kafka.group_id}-sync",
                                  "enable.auto.commit": False, "isolation.level": "read_uncommitted",
                                  "fetch.max.bytes": 96 << 20, "receive.message.max.bytes": 128 << 20,
                                  "max.partition.fetch.bytes": 64 << 20, "queued.max.messages.kbytes": 256 << 10,
                                  "fetch.wait.max.ms": 50, "log_level": 3})
        self.next: dict[int, int] = {}    # partition -> the offset after the last record read

    def start(self, positions: dict[int, int]) -> None:
        """Read every partition from ``positions`` (partition -> offset), or, for a partition not in it,
        from the first record at or after ``since_ms``."""
        meta = self.consumer.list_topics(self.topic, timeout=30)
        if self.topic not in meta.topics or meta.topics[self.topic].error is not None:
            raise RuntimeError(f"the sync topic {self.topic!r} does not exist on {self.servers} "
                               "(`freshet topics` or any `freshet run` creates the job's topics)")
        partitions = sorted(meta.topics[self.topic].partitions)
        start = {p: positions[p] for p in partitions if p in positions}
        missing = [p for p in partitions if p not in start]
        if missing:
            found = self.consumer.offsets_for_times([TopicPartition(self.topic, p, self.since_ms) for p in missing],
                                                    timeout=30)
            for tp in found:    # -1: no record at or after since_ms yet: the partition's end
                start[tp.partition] = tp.offset if tp.offset >= 0 else self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, tp.partition), timeout=30, cached=False)[1]
        self.next = dict(start)
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in sorted(start.items())])

    def poll(self, timeout: float = 0.0) -> list[tuple[int, int, bytes]]:
        """The records that arrived since the last poll, as (partition, offset, value); with ``timeout``, waits
        that long for the first one."""
        out: list[tuple[int, int, bytes]] = []
        while True:
            batch = self.consumer.consume(num_messages=500, timeout=timeout)
            for msg in batch:
                if msg.error():
                    if msg.error().code() == -191:  # _PARTITION_EOF
                        continue
                    raise KafkaException(msg.error())
                out.append((msg.partition(), msg.offset(), msg.value()))
                self.next[msg.partition()] = msg.offset() + 1
            if not batch:
                return out
            timeout = 0.0

    def positions(self) -> dict[int, int]:
        """Partition -> the offset after the last record read (where :meth:`start` would go on)."""
        return dict(self.next)

    def close(self) -> None:
        self.consumer.close()


class SyncSender:
    """A replica's own sync records, produced to ``kafka.sync_topic`` by the replica itself (parallelism > 1),
    keyed by sender (one partition keeps a sender's records in order). :meth:`send` returns once the broker
    has the record: a restore then never waits for a delta its sender had logged as sent but that was lost
    (the sender's restore sends again only what came after its checkpoint). Through a Flink at-least-once
    Kafka sink instead, records in flight when a failover cancelled the task failed the sink's close and
    took the surviving TaskManager down with them (docs/ARCHITECTURE.md)."""

    def __init__(self, cfg: Config, timeout_s: float = 60.0):
        self.topic, self.timeout_s, self.servers = cfg.kafka.sync_topic, timeout_s, cfg.kafka.bootstrap_servers
        self.producer = Producer({**cfg.kafka.client_properties(), "message.max.bytes": 64 << 20,
                                  "enable.idempotence": True, "linger.ms": 0, "log_level": 3,
                                  "compression.type": "lz4"})     # the deltas are not compressed (SharedDelta)

    def send(self, key: str, value: bytes | str) -> None:
        report = DeliveryReport()
        self.producer.produce(self.topic, key=key.encode(), value=value.encode() if isinstance(value, str) else value,
                              on_delivery=report)
        if self.producer.flush(self.timeout_s) or report.failed:
            raise RuntimeError(f"a sync record did not reach {self.topic!r} on {self.servers} within "
                               f"{self.timeout_s:.0f}s ({report.first_error or 'not acknowledged'})")

    def close(self) -> None:
        self.producer.flush(self.timeout_s)
