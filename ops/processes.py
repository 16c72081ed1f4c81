"""Background service processes tracked by pid files: start once, stop by process id, ask if alive."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def log_since(log_file: Path, offset: int = 0) -> str:
    """What ``log_file`` got after byte ``offset`` ("" if there is no such file)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _last_lines(log_file: Path | None, text: str) -> str:
    return f"\n--- last lines of {log_file} ---\n" + "\n".join(text.splitlines()[-25:]) if log_file else ""


def wait_for_port(host: str, port: int, timeout: float, what: str, log_file: Path | None = None,
                  pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if pid is not None and not pid_alive(pid):
            break
        time.sleep(0.2)
    tail = _last_lines(log_file, log_since(log_file)) if log_file and log_file.is_file() else ""
    raise RuntimeError(f"{what} did not come up on {host}:{port} within {timeout:.0f}s{tail}")


def wait_for_log_line(log_file: Path, offset: int, line: str, timeout: float, what: str, pid: int) -> None:
    """Wait until ``line`` appears in ``log_file`` after byte ``offset`` while process ``pid`` lives.

    Raises RuntimeError with the log written since ``offset`` (its last lines) when the process exits first
    or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = log_since(log_file, offset)
        if line in text and pid_alive(pid):
            return
        if not pid_alive(pid) or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    state = "exited" if not pid_alive(pid) else f"did not start within {timeout:.0f}s"
    raise RuntimeError(f"{what} {state}{_last_lines(log_file, text)}")


def private_tmp_dir(root: Path) -> Path:
    """``root/pid-<this process's id>``, created, and removed when this process exits normally.

    Folders of processes that are gone are removed first: what a process stopped with SIGTERM or
    ``kill -9`` (and the JVM it started) could not delete itself.
    """
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("pid-*"):
        pid = old.name[len("pid-"):]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"pid-{os.getpid()}"
    mine.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, mine, True)
    return mine


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pids, timeout: float) -> bool:
    """Until none of ``pids`` is alive (a JVM killed with -9 takes a moment to free its memory and go), at most
    ``timeout`` seconds; True if they are all gone."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def signal_quietly(pid: int, sig: int) -> None:
    """Send ``sig`` to process ``pid``; nothing if it is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def read_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def spawn(cmd: list[str], pid_file: Path, log_file: Path, env: dict[str, str], cwd: Path | None = None) -> int:
    """Start ``cmd`` in its own session, output to ``log_file``, and record its pid."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def stop_pid_file(pid_file: Path, timeout: float = 20.0) -> bool:
    """SIGTERM the recorded process group, SIGKILL it after ``timeout``; True if something was stopped."""
    pid = read_pid(pid_file)
    pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
        if wait_gone([pid], wait):
            return True
    return True


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of process ``pid``: thread id -> (its name as the kernel has it, at most 15 characters; CPU
    seconds, user and system), from ``/proc/<pid>/task/*/stat``. A JVM gives its threads' names to the kernel
    (Flink's task threads: the task's name, e.g. ``recommend-onlin``); threads a native library starts take
    their creator's name unless they name themselves (librdkafka's: ``rdk:...``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:            # the thread ended
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = (name, (int(rest[11]) + int(rest[12])) / tick)
    return out


def own_thread_group_cpu() -> float | None:
    """CPU seconds of this process's threads that share the calling thread's kernel name (itself, and the threads it
    started that did not name themselves: TensorFlow's pools started from a Flink task thread), or None off Linux."""
    try:
        name = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()
    except OSError:
        return None
    return sum(cpu for thread, cpu in thread_cpu(os.getpid()).values() if thread == name)

