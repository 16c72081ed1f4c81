"""Stopping and resuming the job: which settings a savepoint fixes, and where its config is kept.

A savepoint (``freshet stop``) or a retained checkpoint holds the job's state; what it cannot hold is
the config the state was made with. Freshet keeps that config beside it, so a resume with a setting
that cannot change (the model's kind or size, how users are split into model shards) fails before the
job starts, in one line naming the setting, instead of failing inside the job or silently starting a
fresh model. Every other setting (K, learning rates, batch size, behaviour weights, ...) just takes effect.

* ``<home>/jobs/<job id>.json``: the config of each job started by ``freshet run`` or ``freshet submit``;
* ``<savepoint>/freshet-config.json``: copied there by ``freshet stop``;
* a retained checkpoint ``<home>/checkpoints/<job id>/chk-<n>`` is matched to its job's file by the job id.

>>> from freshet.conf.settings import load_config
>>> cfg = load_config(env={})
>>> incompatible(config_record(cfg), cfg.replace(model={"k": 20, "learning_rate": 0.1}))   # these may change
[]
>>> incompatible(config_record(cfg), cfg.replace(model={"dim": 16}))
['model.dim is 32 in the savepoint, 16 now (part of the saved state: set it back, or start fresh)']
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from freshet.conf.settings import Config, ConfigError
from freshet.models.base import FIXED_SETTINGS

CONFIG_FILE = "freshet-config.json"
# (section, key): settings baked into the saved state. The model's variables have shapes set by its kind
# and size; users are split into model shards by the parallelism (one model per shard), and keyed state into
# key groups by the max parallelism.
FIXED = tuple(("model", key) for key in FIXED_SETTINGS) + (("flink", "parallelism"), ("flink", "max_parallelism"))


def config_record(cfg: Config) -> dict:
    """The config as plain JSON data (every section)."""
    return json.loads(json.dumps({f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)},
                                 default=list))


def incompatible(saved: dict, cfg: Config) -> list[str]:
    """The fixed settings that differ between ``saved`` (a :func:`config_record`) and ``cfg``."""
    now = config_record(cfg)
    return [f"{section}.{key} is {saved[section][key]!r} in the savepoint, {now[section][key]!r} now".replace("'", "")
            + " (part of the saved state: set it back, or start fresh)"
            for section, key in FIXED if section in saved and key in saved[section] and saved[section][key] != now[section][key]]


def jobs_dir(cfg: Config) -> Path:
    return cfg.local.home_path() / "jobs"


def checkpoint_dir(cfg: Config) -> Path:
    """Where jobs write checkpoints (``<job id>/chk-<n>``; kept when a job is cancelled or its client dies)."""
    return cfg.local.home_path() / "checkpoints"


def savepoint_dir(cfg: Config) -> Path:
    """Where savepoints go unless ``freshet stop --savepoint-dir`` says otherwise."""
    return cfg.local.home_path() / "savepoints"


def record_job(cfg: Config, job_id: str, bounded: bool) -> Path:
    """Keep the config a job started with (``<home>/jobs/<job id>.json``), and whether its input was bounded."""
    path = jobs_dir(cfg) / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**config_record(cfg), "bounded": bounded}, indent=1))
    return path


def attach_config(cfg: Config, job_id: str, savepoint: str) -> None:
    """Copy the job's recorded config into a savepoint folder (a local path or ``file:`` URI)."""
    source = jobs_dir(cfg) / f"{job_id}.json"
    folder = local_path(savepoint)
    if source.is_file() and folder is not None and folder.is_dir():
        (folder / CONFIG_FILE).write_text(source.read_text())


def local_path(location: str) -> Path | None:
    """A savepoint location as a local path (``file:/x``, ``file:///x`` or ``/x``); None for other file systems."""
    if location.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", location))
    return None if re.match(r"^[a-z][a-z0-9+.-]*://", location) else Path(location)


def saved_config(cfg: Config, location: str) -> dict | None:
    """The config recorded for a savepoint or retained checkpoint, or None when Freshet did not record one."""
    folder = local_path(location)
    if folder is None:
        return None
    if not folder.exists():
        raise ConfigError(f"no savepoint or checkpoint at {location}")
    if (folder / CONFIG_FILE).is_file():
        return json.loads((folder / CONFIG_FILE).read_text())
    job = re.search(r"([0-9a-f]{32})", str(folder.resolve()))        # <checkpoints>/<job id>/chk-<n>
    recorded = jobs_dir(cfg) / f"{job.group(1)}.json" if job else None
    return json.loads(recorded.read_text()) if recorded and recorded.is_file() else None


def check_resume(cfg: Config, location: str, bounded: bool) -> None:
    """Raise :class:`ConfigError` (one line) when ``cfg`` cannot resume the state at ``location``.

    A resumed job is unbounded: Flink's Kafka source restored from a savepoint or retained checkpoint never
    signals the end of a bounded input (FLINK-31006, open in flink-connector-kafka 4.0), so a bounded resume
    would run forever. End a resumed job with ``freshet stop --drain`` once its input is read.
    """
    saved = saved_config(cfg, location)
    problems = incompatible(saved, cfg) if saved else []
    if bounded:
        problems.append("--bounded cannot resume (a restored Kafka source never ends a bounded input: "
                        "FLINK-31006): resume without it and end the job with `freshet stop --drain`")
    if problems:
        raise ConfigError(f"cannot resume from {location}: {'; '.join(problems)}")


def latest_checkpoint(cfg: Config, job_id: str | None = None) -> Path | None:
    """The newest retained checkpoint (``chk-<n>`` with its ``_metadata``) of ``job_id``, or of any job."""
    root = checkpoint_dir(cfg)
    found = [p for p in root.glob(f"{job_id or '*'}/chk-*") if (p / "_metadata").is_file()]
    return max(found, key=lambda p: (p / "_metadata").stat().st_mtime) if found else None
