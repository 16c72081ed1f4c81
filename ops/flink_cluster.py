"""A local standalone Flink cluster (one JobManager, ``local.taskmanagers`` TaskManagers) on 127.0.0.1, and jobs.

The processes come from the installed apache-flink distribution (``pyflink/bin``); their configuration,
logs and pid files live under ``<home>/flink-cluster`` (never inside site-packages). Jobs are sent with
the standard ``flink run``, so submitting to a remote cluster is the same command with another address.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyflink
import yaml

from freshet.conf.settings import Config
from freshet.ops import processes, savepoints
from freshet.ops.python_workers import worker_environment

HOST = "127.0.0.1"
FLINK_HOME = Path(pyflink.__file__).parent
# A drain goes through a resumed job once the sources have read nothing for window.idleness_ms minus this: the
# sources of the job being drained must not turn idle between the check and the drain (FLINK-40499), and the
# REST API's sourceIdleTime can be 10 s old (Flink's metric fetcher).
DRAIN_IDLE_MARGIN_MS = 15_000
ENDED = ("FINISHED", "FAILED", "CANCELED")     # the states a job does not leave


@dataclass(frozen=True)
class TaskManagerInfo:
    id: str
    slots_total: int
    slots_free: int

    def __str__(self) -> str:
        return f"TaskManager {self.id}: {self.slots_total} slots, {self.slots_free} free"


@dataclass(frozen=True)
class JobInfo:
    id: str
    name: str
    state: str

    def __str__(self) -> str:
        return f"job {self.id} {self.name}: {self.state}"


@dataclass(frozen=True)
class ClusterStatus:
    url: str
    reachable: bool
    taskmanagers: tuple[TaskManagerInfo, ...] = ()
    jobs: tuple[JobInfo, ...] = ()
    wanted: int = 1

    @property
    def running(self) -> bool:
        return self.reachable and len(self.taskmanagers) > 0

    @property
    def slots_total(self) -> int:
        return sum(tm.slots_total for tm in self.taskmanagers)

    @property
    def jobs_running(self) -> int:
        return sum(job.state == "RUNNING" for job in self.jobs)

    def __str__(self) -> str:
        if not self.reachable:
            return f"flink cluster not running ({self.url} unreachable)"
        lines = [f"flink cluster running at {self.url}: {len(self.taskmanagers)} of {self.wanted} TaskManager(s), "
                 f"{self.slots_total} slots ({sum(tm.slots_free for tm in self.taskmanagers)} free), "
                 f"{self.jobs_running} job(s) running"]
        lines += [f"  {tm}" for tm in self.taskmanagers]
        lines += [f"  {job}" for job in self.jobs if job.state not in ENDED]
        return "\n".join(lines)


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
            "taskmanager": {"bind-host": HOST, "host": HOST, "numberOfTaskSlots": self.cfg.local.taskmanager_slots,
                            "memory": {"process": {"size": f"{self.cfg.local.taskmanager_memory_mb}m"}}},
            # A TaskManager killed with -9 is noticed in 15 s (default 50 s), so its job restarts sooner.
            "heartbeat": {"interval": 3000, "timeout": 15000},
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
    def _rest(self, path: str, timeout: float = 2.0, post: dict | None = None) -> dict:
        """GET ``path`` from the REST API, or POST ``post`` as JSON to it; the answer as JSON."""
        request = urllib.request.Request(f"{self.url}{path}", headers={"Content-Type": "application/json"},
                                         data=None if post is None else json.dumps(post).encode())
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> ClusterStatus:
        """What the JobManager reports (TaskManagers a while after they died included: see :meth:`start`)."""
        wanted = self.cfg.local.taskmanagers
        try:
            tms = self._rest("/taskmanagers").get("taskmanagers", [])
            jobs = self._rest("/jobs/overview").get("jobs", [])
        except OSError:
            return ClusterStatus(self.url, False, wanted=wanted)
        return ClusterStatus(self.url, True,
                             tuple(TaskManagerInfo(t["id"], t.get("slotsNumber", 0), t.get("freeSlots", 0)) for t in tms),
                             tuple(JobInfo(j["jid"], j.get("name", ""), j.get("state", "")) for j in jobs), wanted)

    def pids(self) -> dict[str, list[int]]:
        """Process ids from Flink's own pid files (``flink-<user>-<role>.pid``): this cluster's live processes
        only. A pid file keeps the number of a process killed with -9, and Linux hands numbers out again (every
        thread takes one; pid_max is 32768 here), so a stale line can name another process, or a thread of one:
        a number counts only while it names a process whose command line writes to this cluster's logs."""
        out: dict[str, list[int]] = {}
        for f in (self.dir / "pids").glob("flink-*.pid"):
            role = f.stem.split("-")[-1]
            out[role] = [int(x) for x in f.read_text().split() if x.strip().isdigit() and self._ours(int(x))]
        return out

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live process (not a thread) started for this cluster (``-Dlog.file`` in its
        folder: :meth:`_env`)."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        leader = re.search(r"^Tgid:\s*(\d+)", status, re.M)
        return (leader is not None and int(leader.group(1)) == pid and processes.pid_alive(pid)
                and f"-Dlog.file={self.dir / 'logs'}/".encode() in cmdline)

    def _daemon(self, script: str, action: str) -> None:
        done = subprocess.run(["bash", str(FLINK_HOME / "bin" / script), action], env=self._env(),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{script} {action} failed:\n{done.stdout}\n{done.stderr}")

    def start(self, log=print, timeout: float = 90.0) -> ClusterStatus:
        """Bring the cluster up to ``local.taskmanagers`` live TaskManager processes: start the JobManager if
        none answers, then one TaskManager per missing process (a TaskManager killed with -9 is replaced,
        although the JobManager lists it until its heartbeat times out). Idempotent."""
        if not self.status().reachable:
            if processes.port_open(HOST, self.port):
                raise RuntimeError(f"port {self.port} is taken by something that is not a Flink JobManager; stop it "
                                   "or set local.flink_rest_port")
            self._daemon("jobmanager.sh", "start")
            processes.wait_for_port(HOST, self.port, timeout, "the Flink JobManager",
                                    next(iter((self.dir / "logs").glob("*standalonesession*.log")), None))
            deadline = time.monotonic() + timeout
            while not self.status().reachable and time.monotonic() < deadline:   # the port opens first
                time.sleep(0.3)
        live = len(self.pids().get("taskexecutor", []))
        missing = self.cfg.local.taskmanagers - live
        if missing <= 0:
            current = self.status()
            log(f"{current} (already)")
            return current
        known = {tm.id for tm in self.status().taskmanagers}
        for _ in range(missing):
            self._daemon("taskmanager.sh", "start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            # A TaskManager registers first and reports its slots a moment later: wait for both.
            ready = [tm for tm in status.taskmanagers
                     if tm.id not in known and tm.slots_total >= self.cfg.local.taskmanager_slots]
            if len(ready) >= missing:
                log(f"started {missing} TaskManager(s)" + (f" ({live} were running)" if live else ""))
                log(str(status))
                return status
            time.sleep(0.5)
        raise RuntimeError(f"{missing} new TaskManager(s) did not register within {timeout:.0f}s; "
                           f"see {self.dir / 'logs'}")

    def stop(self, log=print) -> None:
        """Stop this cluster's processes (TaskManagers first) as Flink's scripts do: SIGTERM, then SIGKILL what is
        left after 30 s. Not through ``stop-all``: it signals every number in the pid files, stale ones too
        (:meth:`pids`)."""
        running = self.pids()
        for role in sorted(running, key=lambda r: r != "taskexecutor"):
            for pid in running[role]:
                processes.signal_quietly(pid, signal.SIGTERM)
        everyone = [p for ps in running.values() for p in ps]
        processes.wait_gone(everyone, 30)
        for pid in (p for p in everyone if self._ours(p)):
            processes.signal_quietly(pid, signal.SIGKILL)
        processes.wait_gone(everyone, 30)
        for f in (self.dir / "pids").glob("flink-*.pid"):
            f.unlink()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)   # incl. what processes killed with -9 left behind
        log("flink cluster stopped" if everyone else "flink cluster was not running")

    # ---- jobs ---------------------------------------------------------------------------------
    def submit(self, config_path: Path | None, bounded: bool, env_overrides: dict[str, str] | None = None,
               from_savepoint: str | None = None) -> str:
        """``flink run`` the job (detached), from a savepoint or retained checkpoint if given; returns its job
        id. The connector jars travel with the job (``pipeline.jars``, set by the job itself), so the cluster
        needs nothing installed for Kafka."""
        args = [str(FLINK_HOME / "bin" / "flink"), "run", "-d", "-m", f"{HOST}:{self.port}",
                *(["-s", from_savepoint] if from_savepoint else []),
                "-pyexec", sys.executable, "-pyclientexec", sys.executable,
                "-pym", "freshet.jobs.recommender_job", "--no-wait"]
        job_args = ((["--config", str(Path(config_path).resolve())] if config_path else []) + (["--bounded"] if bounded else [])
                    + (["--from-savepoint", from_savepoint] if from_savepoint else []))   # the job keeps its model shards
        env = {**self._env(), **(env_overrides or {})}
        done = subprocess.run(args + job_args, env=env, capture_output=True, text=True, timeout=300)
        for line in (done.stdout + done.stderr).splitlines():
            if savepoints.RESCALE_NOTICE in line:        # the job's own word on a rescaled resume, for the user
                print(line[line.index(savepoints.RESCALE_NOTICE):], file=sys.stderr)
        match = re.search(r"JobID ([0-9a-f]{32})", done.stdout + done.stderr)
        if done.returncode != 0 or not match:
            raise RuntimeError(f"flink run failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        return match.group(1)

    def stop_job(self, job_id: str, target_dir: Path | None = None, timeout: float = 300.0, log=print,
                 drain: bool = False) -> str:
        """Flink's stop-with-savepoint (sources stop, a last savepoint is taken and the sinks commit it, the job
        ends FINISHED); returns the savepoint's location. Windows still open stay in the savepoint: a job
        resumed from it closes them when its input goes on. ``drain``: end of input first (every open window
        is closed and listed), for a job that is done for good.

        A source that is idle (nothing read for ``window.idleness_ms``) when Flink drains never delivers the end
        of event time (Flink 2.3: its output drops the final watermark while idle, FLINK-40499), so no window
        still open would be listed. A job whose sources may be idle is therefore stopped with a savepoint and
        resumed from it, and the resumed job, whose sources have just started, is drained (:meth:`_drain_resumed`).
        """
        if drain:
            idle_ms, idleness_ms = self.source_idle_ms(job_id), self._job_idleness_ms(job_id)
            if idleness_ms > 0 and (idle_ms is None or idle_ms >= idleness_ms - DRAIN_IDLE_MARGIN_MS):
                return self._drain_resumed(job_id, target_dir, timeout, log, idle_ms)
        return self._stop_with_savepoint(job_id, target_dir, timeout, log, drain)

    def _stop_with_savepoint(self, job_id: str, target_dir: Path | None, timeout: float, log, drain: bool) -> str:
        state = self.job_state(job_id)
        if state != "RUNNING":
            raise RuntimeError(f"job {job_id} is {state}, not RUNNING: nothing to stop")
        target = (target_dir or savepoints.savepoint_dir(self.cfg)).resolve()
        trigger = self._rest(f"/jobs/{job_id}/stop", timeout=10,
                             post={"targetDirectory": target.as_uri(), "drain": drain})["request-id"]
        log(f"stopping job {job_id} with a savepoint in {target}{' (draining: every open window closes)' if drain else ''} ...")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self._rest(f"/jobs/{job_id}/savepoints/{trigger}")
            if answer.get("status", {}).get("id") == "COMPLETED":
                operation = answer.get("operation", {})
                if "location" not in operation:
                    cause = operation.get("failure-cause", {}).get("stack-trace", "unknown cause").splitlines()
                    raise RuntimeError(f"the savepoint of job {job_id} failed: {cause[0] if cause else ''}")
                state = self.wait(job_id, timeout=max(deadline - time.monotonic(), 10))   # the sinks commit
                if state != "FINISHED":
                    raise RuntimeError(f"job {job_id} ended {state} after its savepoint {operation['location']}")
                savepoints.attach_config(self.cfg, job_id, operation["location"])   # for a resume's checks and shards
                return operation["location"]
            time.sleep(0.5)
        raise TimeoutError(f"the savepoint of job {job_id} did not complete within {timeout:.0f}s")

    def _drain_resumed(self, job_id: str, target_dir: Path | None, timeout: float, log, idle_ms: float | None) -> str:
        """Stop ``job_id`` with a savepoint, resume it from there with the config it was started with but without
        idleness (``window.idleness_ms`` may change on resume; a source that reads nothing would turn idle again
        before the drain), and drain the resumed job as soon as all its tasks run. Nothing is read twice or
        lost: the savepoint holds the offsets, the open windows and the model."""
        since = "for an unknown time" if idle_ms is None else f"for {idle_ms / 1000:.0f}s"
        log(f"job {job_id}: its sources have read nothing {since}, and Flink 2.3 does not deliver the end of event time "
            "from an idle source (FLINK-40499): stopping it with a savepoint, then draining it resumed from there")
        location = self._stop_with_savepoint(job_id, target_dir, timeout, log, drain=False)
        record = savepoints.jobs_dir(self.cfg) / f"{job_id}.json"
        if not record.is_file():
            raise RuntimeError(f"job {job_id} was stopped with a savepoint at {location}, but its config was not "
                               f"recorded ({record} is missing): resume it with `freshet submit --from-savepoint "
                               f"{location}` and drain that job within window.idleness_ms")
        settings = savepoints.job_settings(json.loads(record.read_text()))
        settings.setdefault("window", {})["idleness_ms"] = 0      # its sources never turn idle before the drain
        config = record.with_name(f"{job_id}-drain.yaml")
        config.write_text(yaml.safe_dump(settings))
        resumed = self.submit(config, bounded=False, from_savepoint=location)
        log(f"job {job_id} resumed as {resumed} to drain it")
        self.wait_running(resumed, timeout=timeout)
        return self._stop_with_savepoint(resumed, target_dir, timeout, log, drain=True)

    def source_idle_ms(self, job_id: str) -> float | None:
        """How long the least idle source subtask of the job has read nothing (Flink's ``sourceIdleTime``), or
        None when Flink does not say."""
        try:
            vertex = next(v for v in self._rest(f"/jobs/{job_id}").get("vertices", []) if v["name"].startswith("Source"))
            names = {m["id"].split(".", 1)[1] for m in self._rest(f"/jobs/{job_id}/vertices/{vertex['id']}/metrics")
                     if m["id"].endswith("sourceIdleTime") and "." in m["id"]}
            if not names:
                return None
            values = self._rest(f"/jobs/{job_id}/vertices/{vertex['id']}/subtasks/metrics?get={sorted(names)[0]}&agg=min")
            return float(values[0]["min"]) if values else None
        except (OSError, StopIteration, KeyError, ValueError, IndexError):
            return None

    def _job_idleness_ms(self, job_id: str) -> int:
        """The job's ``window.idleness_ms`` as it was started (recorded by the job), else this config's."""
        record = savepoints.jobs_dir(self.cfg) / f"{job_id}.json"
        if record.is_file():
            return int(json.loads(record.read_text()).get("window", {}).get("idleness_ms", self.cfg.window.idleness_ms))
        return self.cfg.window.idleness_ms

    def wait_running(self, job_id: str, timeout: float = 300.0) -> None:
        """Until the job and every one of its tasks run (Flink refuses a savepoint before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._rest(f"/jobs/{job_id}")
            if info.get("state") == "RUNNING" and all(v.get("status") == "RUNNING" for v in info.get("vertices", [])):
                return
            if info.get("state") in ENDED:
                raise RuntimeError(f"job {job_id} ended {info['state']} before it was running")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not running after {timeout:.0f}s")

    def checkpoints(self, job_id: str) -> dict:
        """Flink's checkpoint statistics of a job (counts, latest completed / restored)."""
        return self._rest(f"/jobs/{job_id}/checkpoints")

    def job_state(self, job_id: str) -> str:
        return self._rest(f"/jobs/{job_id}").get("state", "UNKNOWN")

    def cancel(self, job_id: str, timeout: float = 60.0) -> str:
        """Cancel a job (no savepoint; its last checkpoint is retained) and wait until it has ended."""
        request = urllib.request.Request(f"{self.url}/jobs/{job_id}?mode=cancel", method="PATCH")
        urllib.request.urlopen(request, timeout=10).close()
        return self.wait(job_id, timeout)

    def wait(self, job_id: str, timeout: float = 600.0, states=ENDED) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (state {self.job_state(job_id)})")
