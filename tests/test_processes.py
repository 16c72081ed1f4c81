"""Process helpers: temporary folders that outlive a killed process are cleaned by the next one."""
from __future__ import annotations

import os
import subprocess

from freshet.ops import processes


def test_private_tmp_dir_removes_folders_of_dead_processes_only(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"pid-{gone.pid}"
    (dead / "flink-rpc.jar").parent.mkdir(parents=True)
    (dead / "flink-rpc.jar").write_bytes(b"x" * 1024)
    alive = tmp_path / f"pid-{os.getppid()}"      # the process that started this one is still running
    alive.mkdir()
    other = tmp_path / "not-a-pid-folder"
    other.mkdir()

    mine = processes.private_tmp_dir(tmp_path)

    assert mine == tmp_path / f"pid-{os.getpid()}" and mine.is_dir()
    assert not dead.exists()
    assert alive.is_dir() and other.is_dir()


def test_a_cluster_counts_only_its_own_processes_from_its_pid_files_and_stops_only_them(tmp_path):
    """A pid file keeps the numbers of TaskManagers killed with -9, and Linux hands numbers out again: a stale
    line that now names another process, or a thread of one, is neither counted nor signalled by stop()."""
    import sys
    import threading

    from freshet.conf.settings import Config
    from freshet.ops.flink_cluster import LocalFlinkCluster

    cluster = LocalFlinkCluster(Config().replace(local={"home": str(tmp_path), "flink_rest_port": 18999}))
    (cluster.dir / "pids").mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleep + [f"-Dlog.file={cluster.dir / 'logs'}/flink-taskexecutor-0.log"])
    stranger = subprocess.Popen(sleep + ["-Dlog.file=/elsewhere/logs/flink-taskexecutor-0.log"])
    parked = threading.Event()
    thread = threading.Thread(target=parked.wait)
    thread.start()
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        (cluster.dir / "pids" / "flink-root-taskexecutor.pid").write_text(
            "\n".join(str(p) for p in (gone.pid, stranger.pid, thread.native_id, ours.pid)) + "\n")
        assert cluster.pids() == {"taskexecutor": [ours.pid]}
        cluster.stop(log=lambda *_: None)
        assert ours.wait(timeout=30) is not None
        assert stranger.poll() is None and thread.is_alive(), "stop() signals only the cluster's own processes"
        assert not list((cluster.dir / "pids").glob("*.pid"))
    finally:
        parked.set()
        thread.join()
        stranger.kill()
        ours.kill()
