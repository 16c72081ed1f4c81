"""The typed, validated configuration of Freshet: one home for every knob.

A config is read once from YAML (default ``conf/freshet.yaml``), overridden by environment variables
``FRESHET_<SECTION>__<KEY>`` and validated; a bad value raises :class:`ConfigError` naming the key.

>>> cfg = load_config(env={"FRESHET_MODEL__DIM": "16"})
>>> cfg.model.dim, cfg.kafka.input_topic
(16, 'behavior-events')
>>> try:
...     load_config(env={"FRESHET_MODEL__K": "0"})
... except ConfigError as e:
...     print(e)
model.k must be >= 1, got 0
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_CONFIG = Path(__file__).with_name("freshet.yaml")
ENV_PREFIX = "FRESHET_"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "behavior-events"
    output_topic: str = "recommendations"
    dlq_topic: str = "behavior-events-dlq"
    metrics_topic: str = "freshet-metrics"
    sync_topic: str = "freshet-model-sync"   # at parallelism > 1: the replicas' changes of the shared model
    group_id: str = "freshet"
    startup_mode: str = "earliest-offset"
    partitions: int = 2
    transaction_timeout_ms: int = 600000
    security: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        _require(bool(self.bootstrap_servers), "kafka.bootstrap_servers must not be empty")
        topics = self.topics()
        _require(all(topics), "kafka topics must not be empty")
        _require(len(set(topics)) == 5,
                 f"kafka input, output, dead-letter, metrics and sync topics must differ, got {topics}")
        _require(self.startup_mode in ("earliest-offset", "latest-offset", "group-offsets"),
                 f"kafka.startup_mode must be earliest-offset|latest-offset|group-offsets, got {self.startup_mode!r}")
        _require(self.partitions >= 1, f"kafka.partitions must be >= 1, got {self.partitions}")
        _require(
            0 < self.transaction_timeout_ms <= 900000,
            "kafka.transaction_timeout_ms must be in (0, 900000] (the broker's default maximum is 15 min)",
        )

    def topics(self) -> list[str]:
        """Every topic the job reads or writes."""
        return [self.input_topic, self.output_topic, self.dlq_topic, self.metrics_topic, self.sync_topic]

    def client_properties(self) -> dict[str, str]:
        """Properties common to every Kafka client (producer, consumer, admin, Flink connector)."""
        return {"bootstrap.servers": self.bootstrap_servers, **{k: str(v) for k, v in self.security.items()}}

    def __repr__(self) -> str:  # secrets never reach logs
        hidden = {k: "***" for k in self.security}
        return (f"KafkaConfig(bootstrap_servers={self.bootstrap_servers!r}, input_topic={self.input_topic!r}, "
                f"output_topic={self.output_topic!r}, dlq_topic={self.dlq_topic!r}, security={hidden})")


@dataclass(frozen=True)
class LocalConfig:
    home: str = ".freshet"
    kafka_port: int = 9092
    zookeeper_port: int = 2181
    flink_rest_port: int = 8081
    taskmanagers: int = 1
    taskmanager_slots: int = 2
    taskmanager_memory_mb: int = 3072

    def __post_init__(self):
        _require(1 <= self.taskmanagers <= 16, "local.taskmanagers must be in [1, 16]")
        _require(1 <= self.taskmanager_slots <= 64, "local.taskmanager_slots must be in [1, 64]")
        _require(self.taskmanager_memory_mb >= 1024, "local.taskmanager_memory_mb must be >= 1024")

    def home_path(self, root: Path | None = None) -> Path:
        """The git-ignored state folder, relative paths taken from the project root."""
        p = Path(self.home)
        return p if p.is_absolute() else (root or PROJECT_ROOT) / p


@dataclass(frozen=True)
class EventsConfig:
    behaviors: tuple[str, ...] = ("view", "click", "cart", "fav", "buy", "rate")
    weights: Mapping[str, float] = field(default_factory=lambda: {
        "view": 1.0, "click": 2.0, "cart": 3.0, "fav": 3.0, "buy": 5.0, "rate": 1.0})
    rate_min_value: float = 0.0
    max_id_bytes: int = 256
    max_message_bytes: int = 65536
    max_future_ms: int = 86400000
    dedup_horizon_ms: int = 3600000

    def __post_init__(self):
        object.__setattr__(self, "behaviors", tuple(self.behaviors))
        _require(len(self.behaviors) > 0, "events.behaviors must list at least one behaviour")
        missing = [b for b in self.behaviors if b not in self.weights]
        _require(not missing, f"events.weights lacks a weight for {missing}")
        _require(all(float(w) >= 0 for w in self.weights.values()), "events.weights must be >= 0")
        _require(1 <= self.max_id_bytes <= 4096, "events.max_id_bytes must be in [1, 4096]")
        _require(self.max_message_bytes >= 64, "events.max_message_bytes must be >= 64")
        _require(self.max_future_ms >= 0, "events.max_future_ms must be >= 0")
        _require(self.dedup_horizon_ms >= 0, "events.dedup_horizon_ms must be >= 0")


@dataclass(frozen=True)
class WindowConfig:
    size_ms: int = 60000
    out_of_orderness_ms: int = 5000
    idleness_ms: int = 30000
    max_items_per_increment: int = 500
    max_events_per_user_window: int = 100_000   # beyond this, a user's window weighs as this many events

    def __post_init__(self):
        _require(self.size_ms >= 1, f"window.size_ms must be >= 1, got {self.size_ms}")
        _require(self.out_of_orderness_ms >= 0, "window.out_of_orderness_ms must be >= 0")
        _require(self.idleness_ms >= 0, "window.idleness_ms must be >= 0 (0 disables idleness)")
        _require(self.max_items_per_increment >= 1, "window.max_items_per_increment must be >= 1")
        _require(self.max_events_per_user_window >= 1, "window.max_events_per_user_window must be >= 1")


MODEL_KINDS = ("bpr", "sequence", "popularity", "recent-popularity", "transition", "echo")
MAX_MEMORY_ITEMS = 46340      # the sequence model's counts: items² cells, flat int32 positions (46,340² < 2³¹)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "sequence"         # sequence: the sequence-aware model; bpr: online matrix factorisation;
    #                                popularity / recent-popularity / transition: baselines;
    #                                echo: a no-op scorer that lists the user's own window items (benchmarks the plumbing)
    freeze_after_ms: int = 0       # > 0: stop learning at this event time (the "frozen model" baseline)
    sync_every_ms: int = 0         # > 0: lists use parameters synced from training every this much event time
    dim: int = 32
    learning_rate: float = 0.05
    negatives: int = 8
    l2: float = 1e-5
    batch_size: int = 512
    k: int = 10
    exclude_seen: bool = True
    initial_capacity: int = 4096
    max_users: int = 1_000_000     # rows per table at most (memory bound); the stalest rows are evicted beyond
    max_items: int = 1_000_000
    admit_after: int = 1           # an id gets its own row after this many events; until then a shared fallback row
    expire_after_ms: int = 0       # > 0: rows of ids unseen for this much event time are evicted
    seed: int = 7
    device: str = "auto"
    threads: int = 1               # TensorFlow op threads (0: TensorFlow's default, one per core)
    xla: bool = True               # run the per-window loop as one XLA-compiled program (False: a plain TF graph)
    # What a user just did (sequence, transition): the user's last `history` items, each weighted by its
    # behaviour weight times history_decay ** (the user's increments since).
    history: int = 20
    history_decay: float = 0.7
    sequence_negatives: int = 512           # sequence: items sampled per micro-batch, shared by its pairs' softmax
    sequence_learning_rate: float = 0.1     # sequence: Adagrad step size
    sequence_temperature: float = 0.5       # sequence: user vectors are divided by this before scoring
    sequence_memory_items: int = 8192       # sequence: items with counted transitions, a learned feature (0: none)
    popularity_half_life_ms: int = 0        # recent-popularity (and transition's popularity mix): 0 = cumulative
    transition_alpha: float = 0.5           # transition: counts / (times the source item was followed + 1) ** alpha
    transition_symmetric: float = 0.5       # transition: weight of the reverse order (co-occurrence either way)
    transition_popularity: float = 0.1      # transition: weight of the popularity share mixed into every score
    transition_max_items: int = 8192        # transition: rows of its dense count matrix (8192^2 float32 = 256 MiB)

    def __post_init__(self):
        _require(self.kind in MODEL_KINDS, f"model.kind must be one of {'|'.join(MODEL_KINDS)}, got {self.kind!r}")
        _require(self.freeze_after_ms >= 0, "model.freeze_after_ms must be >= 0 (0: never freeze)")
        _require(self.sync_every_ms >= 0, "model.sync_every_ms must be >= 0 (0: lists use the newest parameters)")
        _require(self.sync_every_ms == 0 or self.kind == "bpr",
                 f"model.sync_every_ms > 0 (lists from periodically synced parameters) is built for model.kind bpr "
                 f"only; model.kind is {self.kind}: set model.sync_every_ms to 0")
        _require(self.dim >= 1, f"model.dim must be >= 1, got {self.dim}")
        _require(self.learning_rate > 0, f"model.learning_rate must be > 0, got {self.learning_rate}")
        _require(self.negatives >= 1, f"model.negatives must be >= 1, got {self.negatives}")
        _require(self.l2 >= 0, "model.l2 must be >= 0")
        _require(self.batch_size >= 1, f"model.batch_size must be >= 1, got {self.batch_size}")
        _require(self.k >= 1, f"model.k must be >= 1, got {self.k}")
        _require(self.initial_capacity >= 2, "model.initial_capacity must be >= 2")
        _require(self.max_users >= 1 and self.max_items >= 1, "model.max_users and model.max_items must be >= 1")
        _require(self.admit_after >= 1, f"model.admit_after must be >= 1, got {self.admit_after}")
        _require(self.expire_after_ms >= 0, "model.expire_after_ms must be >= 0 (0: never expire)")
        _require(self.device in ("auto", "cpu", "gpu"), f"model.device must be auto|cpu|gpu, got {self.device!r}")
        _require(self.threads >= 0, "model.threads must be >= 0 (0: TensorFlow's default)")
        _require(self.history >= 1, f"model.history must be >= 1, got {self.history}")
        _require(0.0 <= self.history_decay <= 1.0, f"model.history_decay must be in [0, 1], got {self.history_decay}")
        _require(self.sequence_negatives >= 1, f"model.sequence_negatives must be >= 1, got {self.sequence_negatives}")
        _require(self.sequence_learning_rate > 0 and self.sequence_temperature > 0,
                 "model.sequence_learning_rate and model.sequence_temperature must be > 0")
        _require(0 <= self.sequence_memory_items <= MAX_MEMORY_ITEMS,
                 f"model.sequence_memory_items must be in 0..{MAX_MEMORY_ITEMS} (0: no memory; the counts are items² cells "
                 f"addressed by 32-bit ints, {MAX_MEMORY_ITEMS}² × 4 bytes is already 8 GiB)")
        _require(self.popularity_half_life_ms >= 0, "model.popularity_half_life_ms must be >= 0 (0: cumulative)")
        _require(not (self.kind == "recent-popularity" and self.popularity_half_life_ms == 0),
                 "model.kind recent-popularity needs model.popularity_half_life_ms > 0 (e.g. 86400000, one day)")
        _require(min(self.transition_alpha, self.transition_popularity, self.transition_symmetric) >= 0,
                 "model.transition_alpha, transition_popularity and transition_symmetric must be >= 0")
        _require(self.transition_max_items >= 2, "model.transition_max_items must be >= 2")


@dataclass(frozen=True)
class FlinkConfig:
    parallelism: int = 1
    max_parallelism: int = 128                # Flink's key groups (pipeline.max-parallelism): fixed for a savepoint
    execution_mode: str = "thread"
    checkpoint_interval_ms: int = 10000
    state_backend: str = "hashmap"            # hashmap (heap; fastest for this job's small state) | rocksdb (disk)
    delivery_guarantee: str = "exactly-once"
    transactional_id_prefix: str = "freshet"
    model_snapshot_interval_ms: int = 30000   # processing time between model snapshots in Flink state
    metrics_interval_ms: int = 10000          # processing time between live-metrics records
    watermark_interval_ms: int = 200          # how often the sources emit a watermark (pipeline.auto-watermark-interval)
    model_call_interval_ms: int = 0           # a subtask's rounds of model calls start at most this often (0: per watermark)
    restart_attempts: int = 10
    restart_delay_ms: int = 3000              # the first restart's delay; each next one 1.5x longer ...
    restart_max_delay_ms: int = 60000         # ... up to this
    local_heap_mb: int = 1024                 # JVM heap of the local runtime (`freshet run`); 0: the JVM's default
    python_bundle_time_ms: int = 100          # a Python operator flushes its output at least this often
    python_bundle_size: int = 1000            # ... or after this many input records
    replica_sync: bool = True                 # parallelism > 1: the replicas exchange their shared-model changes
    replica_sync_events: int = 0              # ... at least every this many events learned, splitting calls (0: per call)
    replica_sync_wait_ms: int = 2000          # ... before a call, waits up to this long for the others to catch up (0: never)
    replica_sync_min_change: float = 0.001    # ... sends a shared row once a value moved more than this (0: every change)

    def __post_init__(self):
        _require(self.parallelism >= 1, "flink.parallelism must be >= 1")
        _require(self.parallelism <= self.max_parallelism <= 32768,
                 "flink.max_parallelism must be at least flink.parallelism and at most 32768")
        _require(self.python_bundle_time_ms >= 1 and self.python_bundle_size >= 1,
                 "flink.python_bundle_time_ms and flink.python_bundle_size must be >= 1")
        _require(self.model_snapshot_interval_ms >= 0, "flink.model_snapshot_interval_ms must be >= 0 (0: every call)")
        _require(self.metrics_interval_ms >= 0, "flink.metrics_interval_ms must be >= 0")
        _require(self.watermark_interval_ms >= 1, "flink.watermark_interval_ms must be >= 1 (windows close on watermarks)")
        _require(self.model_call_interval_ms >= 0, "flink.model_call_interval_ms must be >= 0 (0: a call per watermark)")
        _require(self.local_heap_mb == 0 or self.local_heap_mb >= 256,
                 "flink.local_heap_mb must be 0 (the JVM's default) or at least 256")
        _require(self.restart_attempts >= 0 and self.restart_delay_ms >= 0,
                 "flink.restart_attempts and flink.restart_delay_ms must be >= 0")
        _require(self.restart_max_delay_ms >= self.restart_delay_ms,
                 "flink.restart_max_delay_ms must be at least flink.restart_delay_ms")
        _require(self.replica_sync_events >= 0, "flink.replica_sync_events must be >= 0 (0: after every model call)")
        _require(self.replica_sync_wait_ms >= 0, "flink.replica_sync_wait_ms must be >= 0 (0: never wait)")
        _require(0.0 <= self.replica_sync_min_change < 1.0,
                 f"flink.replica_sync_min_change must be >= 0 and < 1 (0: send every change), got {self.replica_sync_min_change}")
        _require(self.execution_mode in ("thread", "process"), "flink.execution_mode must be thread|process")
        _require(self.checkpoint_interval_ms >= 0, "flink.checkpoint_interval_ms must be >= 0 (0 disables)")
        _require(self.state_backend in ("rocksdb", "hashmap"), "flink.state_backend must be rocksdb|hashmap")
        _require(self.delivery_guarantee in ("exactly-once", "at-least-once", "none"),
                 "flink.delivery_guarantee must be exactly-once|at-least-once|none")
        _require(not (self.delivery_guarantee == "exactly-once" and self.checkpoint_interval_ms == 0),
                 "flink.delivery_guarantee exactly-once needs checkpointing: set flink.checkpoint_interval_ms > 0")


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flink: FlinkConfig = field(default_factory=FlinkConfig)

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys changed: ``cfg.replace(model={"dim": 8})``."""
        return _build({name: {**dataclasses.asdict(getattr(self, name)), **sections.get(name, {})}
                       for name in _SECTION_TYPES})


PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SECTION_TYPES = {"kafka": KafkaConfig, "local": LocalConfig, "events": EventsConfig,
                  "window": WindowConfig, "model": ModelConfig, "flink": FlinkConfig}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int):
        _require(isinstance(value, int) and not isinstance(value, bool), f"{where} must be an integer, got {value!r}")
    elif isinstance(default, float):
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        _require(isinstance(value, (str, int)), f"{where} must be a string, got {value!r}")
        value = str(value)
    elif isinstance(default, (tuple, list)):
        _require(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        value = tuple(str(v) for v in value)
    elif isinstance(default, Mapping):
        _require(isinstance(value, Mapping), f"{where} must be a mapping, got {value!r}")
        value = dict(value)
    return value


def _build(raw: Mapping[str, Any]) -> Config:
    unknown = set(raw) - set(_SECTION_TYPES)
    _require(not unknown, f"unknown config section(s) {sorted(unknown)}; known: {sorted(_SECTION_TYPES)}")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = dict(raw.get(name) or {})
        defaults = cls()
        known = {f.name for f in fields(cls)}
        bad = set(values) - known
        _require(not bad, f"unknown key(s) {sorted(bad)} in section '{name}'; known: {sorted(known)}")
        for key, value in values.items():
            values[key] = _coerce(name, key, value, getattr(defaults, key))
        sections[name] = cls(**values)
    return Config(**sections)


def dump_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as a YAML file that :func:`load_config` reads back to the same config (for ``--config``)."""
    data = {name: {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
                   for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in _SECTION_TYPES}
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read YAML from ``path`` (default ``conf/freshet.yaml``), apply ``FRESHET_<SECTION>__<KEY>`` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    _require(isinstance(raw, dict), f"{path}: top level must be a mapping of sections")
    env = os.environ if env is None else env
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX):].partition("__")
        section, key = section.lower(), key.lower()
        _require(section in _SECTION_TYPES, f"{var}: unknown config section '{section}'")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][key] = yaml.safe_load(text) if text != "" else ""
    return _build(raw)
