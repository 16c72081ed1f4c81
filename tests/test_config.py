import pytest

from freshet.conf.settings import ConfigError, load_config


def test_defaults_load_and_are_typed():
    cfg = load_config(env={})
    assert cfg.kafka.input_topic == "behavior-events"
    assert cfg.model.k == 10 and isinstance(cfg.model.learning_rate, float)
    assert cfg.model.kind == "sequence"    # the default since it beat BPR and every baseline (docs/EVALUATION.md)
    assert set(cfg.events.behaviors) == {"view", "click", "cart", "fav", "buy", "rate"}


def test_environment_overrides_any_key():
    cfg = load_config(env={"FRESHET_KAFKA__BOOTSTRAP_SERVERS": "broker:9093", "FRESHET_MODEL__DIM": "8",
                           "FRESHET_MODEL__EXCLUDE_SEEN": "false"})
    assert cfg.kafka.bootstrap_servers == "broker:9093"
    assert cfg.model.dim == 8 and cfg.model.exclude_seen is False


@pytest.mark.parametrize("env, message", [
    ({"FRESHET_MODEL__K": "0"}, "model.k"),
    ({"FRESHET_MODEL__DIM": "abc"}, "model.dim must be an integer"),
    ({"FRESHET_KAFKA__OUTPUT_TOPIC": "behavior-events"}, "must differ"),
    ({"FRESHET_NOPE__X": "1"}, "unknown config section"),
    ({"FRESHET_MODEL__NOPE": "1"}, "unknown key"),
    ({"FRESHET_FLINK__CHECKPOINT_INTERVAL_MS": "0"}, "exactly-once needs checkpointing"),
    ({"FRESHET_FLINK__WATERMARK_INTERVAL_MS": "0"}, "flink.watermark_interval_ms must be >= 1"),
    ({"FRESHET_MODEL__SEQUENCE_MEMORY_ITEMS": "50000"}, "model.sequence_memory_items must be in 0..46340"),
    ({"FRESHET_MODEL__SYNC_EVERY_MS": "600000"}, "built for model.kind bpr only; model.kind is sequence"),
    ({"FRESHET_FLINK__REPLICA_SYNC_MIN_CHANGE": "-0.001"}, "flink.replica_sync_min_change must be >= 0"),
])
def test_bad_values_name_the_key(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_secrets_are_hidden_when_printed():
    cfg = load_config(env={}).replace(kafka={"security": {"sasl.password": "hunter2"}})
    assert "hunter2" not in repr(cfg.kafka) and "hunter2" not in repr(cfg)
    assert cfg.kafka.client_properties()["sasl.password"] == "hunter2"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_dumped_config_loads_back_identical(tmp_path):
    from freshet.conf.settings import dump_config
    cfg = load_config(env={}).replace(kafka={"input_topic": "x-in", "security": {"sasl.mechanism": "PLAIN"}},
                                      model={"dim": 8})
    assert load_config(dump_config(cfg, tmp_path / "c.yaml"), env={}) == cfg
