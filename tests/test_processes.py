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
