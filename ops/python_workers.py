"""What Flink's Python workers need from this environment before the job starts."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def worker_environment() -> dict[str, str]:
    """Environment for a JVM that runs the job's Python operators in thread mode: the embedded
    interpreter is the one found first on PATH, so this venv's ``bin`` goes first."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        path = bin_dir + os.pathsep + path
    return {"PATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}
