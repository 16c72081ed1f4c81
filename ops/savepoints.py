"""Stopping and resuming the job: which settings a savepoint fixes, and where its config is kept.

A savepoint (``freshet stop``) or a retained checkpoint holds the job's state; what it cannot hold is
the config the state was made with. Freshet keeps that config beside it, so a resume with a setting
that cannot change (the model's kind or size, the max parallelism) fails before the job starts, in one
line naming the setting, instead of failing inside the job or silently starting a fresh model. Every
other setting (K, learning rates, batch size, behaviour weights, ...) just takes effect.

``flink.parallelism`` may change (a rescale). The job's model shards are recorded with its config
(``shard_keys``), and a resumed job keeps them (:func:`rescaled_shards`): at a lower parallelism several
share a subtask, each still its own replica of the one model; at a higher one new shards start from
copies of old ones (only model kinds whose replicas sync can do that).

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
import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from freshet.conf.settings import Config, ConfigError
from freshet.models.base import FIXED_SETTINGS
from freshet.models.shared import SYNCED_KINDS

CONFIG_FILE = "freshet-config.json"
# (section, key): settings baked into the saved state. The model's variables have shapes set by its kind
# and size; keyed state is split into key groups by the max parallelism. (The parallelism may change: the
# model shards are kept, :func:`rescaled_shards`.)
FIXED = tuple(("model", key) for key in FIXED_SETTINGS) + (("flink", "max_parallelism"),)
# What a job's record holds besides its config: whether its input was bounded, its model shards' keys, and
# whether its per-shard window stage was one task (a version before rescaling, at parallelism 1).
RECORD_EXTRAS = ("bounded", "shard_keys", "singleton_shards")
# How a job resumed with new shards says so on stderr (`freshet submit` passes the line on from `flink run`).
RESCALE_NOTICE = "resuming at parallelism"


class ShardLayout(NamedTuple):
    """A job's model shards: their keys, for a rescaled resume the old shard each new one starts from (new key ->
    old key), and whether one shard is grouped by a constant (``jobs/tables.shard_sql``: kept for p = 1
    savepoints of Freshet versions before rescaling, whose state only that plan restores)."""
    keys: list[int]
    seeds: dict[int, int]
    singleton: bool = False


def config_record(cfg: Config) -> dict:
    """The config as plain JSON data (every section)."""
    return json.loads(json.dumps({f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)},
                                 default=list))


def incompatible(saved: dict, cfg: Config) -> list[str]:
    """The fixed settings that differ between ``saved`` (a :func:`config_record`) and ``cfg``, and a parallelism
    above the saved shard count for a model whose replicas do not sync (a new shard could not copy an old one).

    >>> from freshet.conf.settings import load_config
    >>> cfg = load_config(env={}).replace(model={"kind": "transition"})
    >>> saved = {**config_record(cfg), "shard_keys": [0, 1]}
    >>> incompatible(saved, cfg.replace(flink={"parallelism": 1}))     # going down keeps both shards
    []
    >>> print(incompatible(saved, cfg.replace(flink={"parallelism": 4}))[0][:60])
    flink.parallelism can grow past the savepoint's 2 model shar
    >>> bpr = cfg.replace(model={"kind": "bpr"})
    >>> old = config_record(bpr.replace(flink={"parallelism": 1}))       # p = 1, before rescaling
    >>> print(incompatible(old, bpr.replace(flink={"parallelism": 2}))[0][:57])
    flink.parallelism cannot grow from this savepoint: it was
    """
    now = config_record(cfg)
    problems = [f"{section}.{key} is {saved[section][key]!r} in the savepoint, {now[section][key]!r} now".replace("'", "")
                + " (part of the saved state: set it back, or start fresh)"
                for section, key in FIXED if section in saved and key in saved[section] and saved[section][key] != now[section][key]]
    shards = saved_shard_count(saved)
    if singleton_shards(saved) and cfg.flink.parallelism > 1:
        problems.append("flink.parallelism cannot grow from this savepoint: it was taken at parallelism 1 by a Freshet "
                        "version before rescaling, whose per-shard window stage runs as one task (max parallelism 1 in "
                        "its state): resume it at parallelism 1, or start fresh")
    elif shards and cfg.flink.parallelism > shards and not (cfg.model.kind in SYNCED_KINDS and cfg.flink.replica_sync):
        problems.append(f"flink.parallelism can grow past the savepoint's {shards} model shards only for model kinds "
                        f"{', '.join(SYNCED_KINDS)} with flink.replica_sync on (a new shard starts from a copy of an old "
                        f"one); model.kind is {cfg.model.kind}: resume at parallelism {shards} or less, or start fresh")
    return problems


def singleton_shards(saved: dict) -> bool:
    """Whether a recorded job grouped its one shard by a constant (:class:`ShardLayout`): recorded so, or recorded
    at parallelism 1 without its shard keys (by a version before rescaling)."""
    return bool(saved.get("singleton_shards")) or (
        "shard_keys" not in saved and int(saved.get("flink", {}).get("parallelism", 0)) == 1)


def saved_shard_count(saved: dict) -> int:
    """How many model shards a recorded job had (one per subtask unless it was resumed at a lower parallelism)."""
    if saved.get("shard_keys"):
        return len(saved["shard_keys"])
    return int(saved.get("flink", {}).get("parallelism", 0))


def rescaled_shards(old_keys: Sequence[int], parallelism: int,
                    subtask_of: Callable[[int], int]) -> tuple[list[int], dict[int, int]]:
    """The model shards of a job resumed at ``parallelism`` from a savepoint whose shards had ``old_keys``: their
    keys (the old ones first, in order) and, for each new one, the old shard it starts from (new key -> old key).
    ``subtask_of``: the subtask a key lands on at ``parallelism`` (Flink's key groups).

    * **Down (or the same):** every old shard is kept, several on one subtask where Flink's key groups put them,
      each still a replica of the one model. No user moves, nothing is copied.
    * **Up:** the shard count doubles until it covers the subtasks. A user's shard is ``hash mod count``
      (``jobs/tables.shard_sql``): after doubling, ``hash mod 2S`` is its old index or that plus S, so every user
      of new shard i comes from old shard ``i mod S``, whose copy the new one starts from (its users keep their
      state). A new key goes to the subtask with the fewest shards, never to its source's (the source is loaded
      by its own subtask's first window or timer, while the new one waits for its copy).

    >>> rescaled_shards([0, 5], 1, lambda k: 0)
    ([0, 5], {})
    >>> rescaled_shards([0], 2, lambda k: k % 2)
    ([0, 1], {1: 0})
    >>> keys, seeds = rescaled_shards([0, 1], 3, lambda k: k % 3); keys, seeds
    ([0, 1, 2, 3], {2: 0, 3: 1})
    """
    keys, old = [int(k) for k in old_keys], len(old_keys)
    count = old
    while count < parallelism:
        count *= 2
    load = Counter(subtask_of(k) for k in keys)
    seeds: dict[int, int] = {}
    for index in range(old, count):
        source = keys[index % old]
        avoid = subtask_of(source)
        target = min((j for j in range(parallelism) if j != avoid), key=lambda j: (load[j], j))
        key = next(c for c in itertools.count() if c not in keys and subtask_of(c) == target)
        keys.append(key)
        seeds[key] = source
        load[target] += 1
    return keys, seeds


def jobs_dir(cfg: Config) -> Path:
    return cfg.local.home_path() / "jobs"


def checkpoint_dir(cfg: Config) -> Path:
    """Where jobs write checkpoints (``<job id>/chk-<n>``; kept when a job is cancelled or its client dies)."""
    return cfg.local.home_path() / "checkpoints"


def savepoint_dir(cfg: Config) -> Path:
    """Where savepoints go unless ``freshet stop --savepoint-dir`` says otherwise."""
    return cfg.local.home_path() / "savepoints"


def record_job(cfg: Config, job_id: str, bounded: bool, shards: ShardLayout) -> Path:
    """Keep the config a job started with (``<home>/jobs/<job id>.json``), whether its input was bounded, and its
    model shards (a resume keeps them: :func:`rescaled_shards`)."""
    path = jobs_dir(cfg) / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**config_record(cfg), "bounded": bounded, "shard_keys": [int(k) for k in shards.keys],
                                "singleton_shards": shards.singleton}, indent=1))
    return path


def job_settings(record: dict) -> dict:
    """A job's record as config settings (without :data:`RECORD_EXTRAS`)."""
    return {k: v for k, v in record.items() if k not in RECORD_EXTRAS}


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
