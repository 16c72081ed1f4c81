"""A local standalone Flink cluster (one JobManager, one TaskManager) on 127.0.0.1, and job submission.

The processes come from the installed apache-flink distribution (``pyflink/bin``); their configuration,
logs and pid files live under ``<home>/flink-cluster`` (never inside site-packages). Jobs are sent with
the standard ``flink run``, so submitting to a remote cluster is the same command with another address.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyflink
import yaml

from freshet.conf.settings import Config
from freshet.ops import processes
from freshet.ops.python_workers import worker_environment

HOST = "127.0.0.1"
FLINK_HOME = Path(pyflink.__file__).parent


@dataclass(frozen=True)
class ClusterStatus:
    url: str
    reachable: bool
    taskmanagers: int = 0
    slots_total: int = 0
    jobs_running: int = 0

    @property
    def running(self) -> bool:
        return self.reachable and self.taskmanagers > 0

    def __str__(self) -> str:
        if not self.reachable:
            return f"flink cluster not running ({self.url} unreachable)"
        return (f"flink cluster running at {self.url}: {self.taskmanagers} TaskManager(s), "
                f"{self.slots_total} slots, {self.jobs_running} job(s) running")


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base`` (the distribution's defaults, e.g. its Java 17 ``--add-opens``)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class LocalFlinkCluster:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.port = cfg.local.flink_rest_port
        self.dir = cfg.local.home_path() / f"flink-cluster-{self.port}"  # one folder per cluster
        self.url = f"http://{HOST}:{self.port}"
        self.tmp_dir = self.dir / "tmp"

    # ---- configuration ------------------------------------------------------------------------
    def _write_conf(self) -> Path:
        """Flink's config.yaml for this machine: 127.0.0.1 only, memory sized for 2 cores / 24 GiB."""
        conf = self.dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties", "logback.xml"):
            shutil.copy(FLINK_HOME / "conf" / name, conf / name)
        (conf / "masters").write_text(f"{HOST}:{self.port}\n")
        (conf / "workers").write_text(f"{HOST}\n")
        settings = {
            "jobmanager": {"rpc": {"address": HOST, "port": self.port + 1000}, "bind-host": HOST,
                           "memory": {"process": {"size": "1024m"}}},
            "taskmanager": {"bind-host": HOST, "host": HOST, "numberOfTaskSlots": 2,
                            "memory": {"process": {"size": "3072m"}}},
            "rest": {"address": HOST, "bind-address": HOST, "port": self.port},
            # Temporary files (the RPC system's 24 MB jar each process extracts, blobs, spill files) in the
            # cluster's folder: a process killed with -9 cannot delete its own, and stop() removes them.
            "io": {"tmp": {"dirs": str(self.tmp_dir)}},
            "parallelism": {"default": self.cfg.flink.parallelism},
            "python": {"executable": sys.executable, "client": {"executable": sys.executable}},
        }
        merged = _deep_merge(yaml.safe_load((FLINK_HOME / "conf" / "config.yaml").read_text()) or {}, settings)
        (conf / "config.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        return conf

    def _lib_dir(self) -> Path:
        """The distribution's lib/ plus opt/flink-python (Python operators must load in the JobManager),
        as links in a folder of ours, so site-packages stays untouched."""
        lib = self.dir / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        wanted = list((FLINK_HOME / "lib").glob("*.jar")) + list((FLINK_HOME / "opt").glob("flink-python*.jar"))
        for old in lib.iterdir():
            if old.is_symlink() and not old.exists():
                old.unlink()
        for jar in wanted:
            link = lib / jar.name
            if not link.exists():
                link.symlink_to(jar)
        return lib

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLINK_LIB_DIR": str(self._lib_dir()),
            "FLINK_CONF_DIR": str(self._write_conf()),
            "FLINK_LOG_DIR": str(self.dir / "logs"),
            "FLINK_PID_DIR": str(self.dir / "pids"),
            **worker_environment(),   # for the TaskManager's Python workers
        })
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "pids").mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return env

    # ---- lifecycle ----------------------------------------------------------------------------
    def _rest(self, path: str, timeout: float = 2.0) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> ClusterStatus:
        try:
            o = self._rest("/overview")
        except OSError:
            return ClusterStatus(self.url, False)
        return ClusterStatus(self.url, True, o.get("taskmanagers", 0), o.get("slots-total", 0), o.get("jobs-running", 0))

    def pids(self) -> dict[str, list[int]]:
        """Process ids from Flink's own pid files (``flink-<user>-<role>.pid``), live ones only."""
        out: dict[str, list[int]] = {}
        for f in (self.dir / "pids").glob("flink-*.pid"):
            role = f.stem.split("-")[-1]
            out[role] = [int(x) for x in f.read_text().split() if x.strip().isdigit() and processes.pid_alive(int(x))]
        return out

    def start(self, log=print, timeout: float = 90.0) -> ClusterStatus:
        current = self.status()
        if current.running:
            log(f"{current} (already)")
            return current
        if processes.port_open(HOST, self.port):
            raise RuntimeError(f"port {self.port} is taken by something that is not a Flink cluster with a "
                               "TaskManager; stop it or set local.flink_rest_port")
        done = subprocess.run(["bash", str(FLINK_HOME / "bin" / "start-cluster.sh")], env=self._env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"start-cluster.sh failed:\n{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.running:
                log(str(status))
                return status
            time.sleep(0.5)
        raise RuntimeError(f"the Flink cluster did not come up within {timeout:.0f}s; see {self.dir / 'logs'}")

    def stop(self, log=print) -> None:
        running = self.pids()
        if any(running.values()):
            subprocess.run(["bash", str(FLINK_HOME / "bin" / "stop-cluster.sh")], env=self._env(), capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(processes.pid_alive(p) for ps in running.values() for p in ps):
                time.sleep(0.3)
            for pid in (p for ps in running.values() for p in ps if processes.pid_alive(p)):
                os.kill(pid, 9)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)   # incl. what processes killed with -9 left behind
        log("flink cluster stopped" if any(running.values()) else "flink cluster was not running")

    def start_taskmanager(self, log=print, timeout: float = 90.0) -> None:
        """Start one more TaskManager (after one was lost) and wait until it has registered."""
        before = self.status().taskmanagers
        done = subprocess.run(["bash", str(FLINK_HOME / "bin" / "taskmanager.sh"), "start"], env=self._env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"taskmanager.sh start failed:\n{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status().taskmanagers > before:
                log(str(self.status()))
                return
            time.sleep(0.5)
        raise RuntimeError(f"no new TaskManager registered within {timeout:.0f}s; see {self.dir / 'logs'}")

    # ---- jobs ---------------------------------------------------------------------------------
    def submit(self, config_path: Path | None, bounded: bool, env_overrides: dict[str, str] | None = None) -> str:
        """``flink run`` the job (detached); returns its job id. The connector jars travel with the job
        (``pipeline.jars``, set by the job itself), so the cluster needs nothing installed for Kafka."""
        args = [str(FLINK_HOME / "bin" / "flink"), "run", "-d", "-m", f"{HOST}:{self.port}",
                "-pyexec", sys.executable, "-pyclientexec", sys.executable,
                "-pym", "freshet.jobs.recommender_job"]
        job_args = (["--config", str(Path(config_path).resolve())] if config_path else []) + (["--bounded"] if bounded else [])
        env = {**self._env(), **(env_overrides or {})}
        done = subprocess.run(args + job_args, env=env, capture_output=True, text=True, timeout=300)
        match = re.search(r"JobID ([0-9a-f]{32})", done.stdout + done.stderr)
        if done.returncode != 0 or not match:
            raise RuntimeError(f"flink run failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        return match.group(1)

    def checkpoints(self, job_id: str) -> dict:
        """Flink's checkpoint statistics of a job (counts, latest completed / restored)."""
        return self._rest(f"/jobs/{job_id}/checkpoints")

    def job_state(self, job_id: str) -> str:
        return self._rest(f"/jobs/{job_id}").get("state", "UNKNOWN")

    def wait(self, job_id: str, timeout: float = 600.0, states=("FINISHED", "FAILED", "CANCELED")) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (state {self.job_state(job_id)})")
