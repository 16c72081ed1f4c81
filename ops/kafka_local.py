"""The local Apache Kafka broker (ZooKeeper mode) on 127.0.0.1: start, stop, status; idempotent.

State (logs, data, pids) lives under ``<home>/kafka``; data and committed offsets survive restarts.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from freshet.conf.settings import Config
from freshet.ops import processes, vendor

HOST = "127.0.0.1"
# The broker's ZooKeeper session timeout (set in server.properties, Kafka's default): a broker that died
# without closing its session stays registered in ZooKeeper this long; ZooKeeper restored from its data
# folder also keeps the dead broker's session this long after it starts.
ZK_SESSION_TIMEOUT_MS = 6000
BROKER_STARTED = "started (kafka.server.KafkaServer)"
STALE_REGISTRATION = "node already exists"


@dataclass(frozen=True)
class KafkaStatus:
    zookeeper_pid: int | None
    broker_pid: int | None
    bootstrap: str
    reachable: bool

    @property
    def running(self) -> bool:
        return self.broker_pid is not None and self.reachable

    def __str__(self) -> str:
        if self.running:
            return f"kafka running at {self.bootstrap} (broker pid {self.broker_pid}, zookeeper pid {self.zookeeper_pid})"
        return f"kafka not running (broker pid {self.broker_pid}, zookeeper pid {self.zookeeper_pid})"


class LocalKafka:
    """One ZooKeeper and one broker process, started from the vendored Kafka 2.3.0 on Java 11."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.home = cfg.local.home_path()
        self.dir = self.home / f"kafka-{cfg.local.kafka_port}"  # one folder per broker: tests never touch yours
        self.bootstrap = f"{HOST}:{cfg.local.kafka_port}"

    def _pid_file(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def status(self) -> KafkaStatus:
        return KafkaStatus(processes.read_pid(self._pid_file("zookeeper")), processes.read_pid(self._pid_file("broker")),
                           self.bootstrap, processes.port_open(HOST, self.cfg.local.kafka_port))

    def _write_configs(self) -> tuple[Path, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        zk = self.dir / "zookeeper.properties"
        zk.write_text("\n".join([
            f"dataDir={self.dir / 'zookeeper-data'}",
            f"clientPort={self.cfg.local.zookeeper_port}",
            f"clientPortAddress={HOST}",
            "maxClientCnxns=0",
            "admin.enableServer=false",
        ]) + "\n")
        broker = self.dir / "server.properties"
        broker.write_text("\n".join([
            "broker.id=0",
            f"listeners=PLAINTEXT://{self.bootstrap}",
            f"advertised.listeners=PLAINTEXT://{self.bootstrap}",
            f"log.dirs={self.dir / 'broker-data'}",
            f"zookeeper.connect={HOST}:{self.cfg.local.zookeeper_port}",
            f"zookeeper.session.timeout.ms={ZK_SESSION_TIMEOUT_MS}",
            f"num.partitions={self.cfg.kafka.partitions}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "default.replication.factor=1",
            "min.insync.replicas=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            f"message.max.bytes={max(1048588, self.cfg.events.max_message_bytes * 4)}",
            # Replayed logs carry their historical event time as record timestamps: time-based retention
            # would delete them within minutes (the cleaner compares timestamps with now). Keep by size.
            "log.retention.ms=-1",
            "log.retention.bytes=2147483648",
            "num.network.threads=2",
            "num.io.threads=2",
        ]) + "\n")
        return zk, broker

    def _env(self, java_home: Path, heap: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "JAVA_HOME": str(java_home),
            "PATH": f"{java_home / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "KAFKA_HEAP_OPTS": heap,
            "LOG_DIR": str(self.dir / "logs"),
            "KAFKA_JVM_PERFORMANCE_OPTS": "-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true",
        })
        return env

    def start(self, log=print) -> KafkaStatus:
        """Start ZooKeeper and the broker unless already up, then create Freshet's topics."""
        current = self.status()
        if current.running:
            log(f"{current} (already)")
            self.create_topics(log)
            return current
        if processes.port_open(HOST, self.cfg.local.kafka_port):
            raise RuntimeError(f"port {self.cfg.local.kafka_port} on {HOST} is taken by a process Freshet did not "
                               "start; stop it or set local.kafka_port")
        kafka_dir = vendor.ensure_kafka(self.home, log)
        java_home = vendor.ensure_java11(self.home, log)
        zk_conf, broker_conf = self._write_configs()
        logs = self.dir / "logs"
        if current.zookeeper_pid is None:
            pid = processes.spawn([str(kafka_dir / "bin" / "zookeeper-server-start.sh"), str(zk_conf)],
                                  self._pid_file("zookeeper"), logs / "zookeeper.out",
                                  self._env(java_home, "-Xmx128m -Xms64m"))
            processes.wait_for_port(HOST, self.cfg.local.zookeeper_port, 60, "ZooKeeper", logs / "zookeeper.out", pid)
        self._start_broker(kafka_dir, broker_conf, java_home, log)
        self.create_topics(log)
        status = self.status()
        log(str(status))
        return status

    def _start_broker(self, kafka_dir: Path, broker_conf: Path, java_home: Path, log, attempts: int = 3) -> None:
        """Start the broker and wait until it has registered in ZooKeeper (its port opens before that).

        After a crash or ``kill -9`` (of the broker, or of both processes: ZooKeeper restores the old
        session from its data folder), the dead broker's registration lingers for the session timeout, and
        a new broker that starts within it exits at once ("node already exists"): wait it out and retry.
        """
        out = self.dir / "logs" / "broker.out"
        for attempt in range(1, attempts + 1):
            offset = out.stat().st_size if out.is_file() else 0
            pid = processes.spawn([str(kafka_dir / "bin" / "kafka-server-start.sh"), str(broker_conf)],
                                  self._pid_file("broker"), out, self._env(java_home, "-Xmx512m -Xms256m"))
            try:
                processes.wait_for_log_line(out, offset, BROKER_STARTED, 90, "Kafka broker", pid)
                return
            except RuntimeError:
                if STALE_REGISTRATION not in processes.log_since(out, offset) or attempt == attempts:
                    raise
            log(f"the previous broker is still registered in ZooKeeper; retrying in "
                f"{ZK_SESSION_TIMEOUT_MS / 1000:.0f}s, when its session has expired")
            time.sleep(ZK_SESSION_TIMEOUT_MS / 1000 + 1)

    def stop(self, log=print) -> None:
        stopped_broker = processes.stop_pid_file(self._pid_file("broker"), timeout=30)
        stopped_zk = processes.stop_pid_file(self._pid_file("zookeeper"))
        log("kafka stopped" if (stopped_broker or stopped_zk) else "kafka was not running")

    def create_topics(self, log=print) -> None:
        from freshet.ops.kafka_io import ensure_topics
        created = ensure_topics(self.cfg)
        if created:
            log(f"created topics: {', '.join(created)}")
