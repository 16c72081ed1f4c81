"""The local broker (`freshet kafka start|stop`) comes back after a crash with its data.

A broker of its own (ports 29092/22181, its own folder), so the session broker of the other tests is
never disturbed; started, killed and stopped here by process id.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from freshet.conf.settings import load_config
from freshet.ops import kafka_io, processes
from freshet.ops.kafka_local import ZK_SESSION_TIMEOUT_MS, LocalKafka


@pytest.fixture
def crash_broker():
    cfg = load_config(env={}).replace(
        kafka={"bootstrap_servers": "127.0.0.1:29092", "input_topic": "crash-events"},
        local={"kafka_port": 29092, "zookeeper_port": 22181})
    broker = LocalKafka(cfg)
    broker.stop(log=lambda *_: None)
    shutil.rmtree(broker.dir, ignore_errors=True)
    yield cfg, broker
    broker.stop(log=lambda *_: None)
    shutil.rmtree(broker.dir, ignore_errors=True)


def test_broker_restarts_right_after_kill_9_and_keeps_its_data(crash_broker):
    """A broker killed with -9 stays registered in ZooKeeper for the session timeout; a restart within it
    used to return as soon as the port opened, and the new broker then exited ("node already exists")."""
    cfg, broker = crash_broker
    said: list[str] = []
    broker.start(log=said.append)
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    prod.produce(cfg.kafka.input_topic, key=b"u1", value=b'{"before": "the crash"}', on_delivery=report)
    kafka_io.flush_or_fail(prod, report)

    os.killpg(broker.status().broker_pid, signal.SIGKILL)
    for _ in range(100):      # every thread gone, the port closed
        if broker.status().broker_pid is None and not processes.port_open("127.0.0.1", 29092):
            break
        time.sleep(0.1)
    broker.start(log=said.append)              # within the dead broker's ZooKeeper session
    # The failing broker exits a few seconds after its port opens: it must still be up after that.
    time.sleep(ZK_SESSION_TIMEOUT_MS / 1000)
    status = broker.status()
    assert status.running and processes.pid_alive(status.broker_pid), said
    values = [m.value for m in kafka_io.read_topic(cfg, cfg.kafka.input_topic, read_committed=False)]
    assert values == [b'{"before": "the crash"}']
