"""Config loading: YAML + dotted overrides, round trips, and errors that name the dotted path."""

from pathlib import Path

import pytest

from xlstm_eqx.config import Config, ConfigError, ModelConfig, from_dict, load_config, to_dict

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads_and_round_trips(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert from_dict(Config, to_dict(config)) == config


def test_overrides_are_parsed_as_yaml_and_coerced():
    config = load_config(
        CONFIGS / "tiny.yaml",
        [
            "model.num_blocks=4",
            "model.qk_dim_factor=1",
            "model.fgate_bias_init=[1, 2]",
            "model.gate_soft_cap=null",
        ],
    )
    assert config.model.num_blocks == 4
    assert config.model.qk_dim_factor == 1.0 and isinstance(config.model.qk_dim_factor, float)
    assert config.model.fgate_bias_init == (1.0, 2.0)
    assert config.model.gate_soft_cap is None


def test_derived_sizes_of_the_7b_preset():
    model = load_config(CONFIGS / "xlstm_v1_7b.yaml").model
    assert (model.qk_head_dim, model.v_head_dim, model.ffn_hidden_dim) == (256, 512, 10944)


@pytest.mark.parametrize(
    ("override", "path", "fragment"),
    [
        ("model.num_blcks=4", "model.num_blcks", "unknown key"),
        ("model.num_blocks=four", "model.num_blocks", "expected int"),
        ("model.num_blocks=2.5", "model.num_blocks", "expected int"),
        ("model.num_blocks=yes", "model.num_blocks", "expected int, got True"),  # YAML 1.1: yes is True (== 1)
        ("loop.num_train_steps=true", "loop.num_train_steps", "expected int or null, got True"),
        ("model.kernel=chunked", "model.kernel", "expected one of 'chunkwise', 'parallel', 'recurrent', got 'chunked'"),
        ("mesh.data=false", "mesh.data", "expected int"),
        ("data.validation_files=[val.txt]", "data.validation_files", "read only with corpus: files"),
        ("data.worker_count=-1", "data.worker_count", "must be ≥ 0"),
        ("model.ffn_round_up_to_multiple_of=0", "model.ffn_round_up_to_multiple_of", "must be positive"),
        ("model.kernel=flash", "model.kernel", "expected"),
        ("model.num_heads=3", "model.qk_dim_factor", "multiple of num_heads = 3"),
        ("model.chunk_size=0", "model.chunk_size", "must be positive"),
        ("model.fgate_bias_init=[1, 2, 3]", "model.fgate_bias_init", "expected"),
        ("model=3", "model", "expected a mapping"),
        ("seed.x=1", "seed", "expected int"),
        ("model.num_blocks.x=1", "model.num_blocks", "is a value, not a section"),
    ],
)
def test_bad_values_name_the_dotted_path(override, path, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert info.value.path == path
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_configs_are_frozen_and_hashable():
    config = ModelConfig()
    with pytest.raises(AttributeError):
        config.num_blocks = 3  # type: ignore[misc]
    assert hash(config) == hash(ModelConfig())


@pytest.mark.parametrize(
    "field, value, match",
    [("remat", "blocks", "must be one of"), ("kernel", "chunked", "must be one of"),
     ("scan_blocks", "no", "true or false"), ("compute_dtype", "float16", "must be one of")],
)  # fmt: skip
def test_model_choices_are_checked_without_a_type_checker(field, value, match):
    """Outside the tests nothing type-checks __init__: a typo in an execution policy would only fail deep
    inside a trace (a bare KeyError for remat), or be taken as true (scan_blocks)."""
    config = ModelConfig()
    object.__setattr__(config, field, value)
    with pytest.raises(ConfigError, match=match) as info:
        config.__post_init__()
    assert info.value.path == field


def test_a_checkpoint_monitor_needs_checkpoints_at_validation():
    """Only the saves after a validation carry its metrics: a monitor without them would rank nothing, and the
    test would silently run on the last state instead of the best one."""
    with pytest.raises(ConfigError, match="at_validation is false") as info:
        from_dict(Config, {"checkpoint": {"monitor": "loss", "at_validation": False}})
    assert info.value.path == "checkpoint.monitor"
    from_dict(Config, {"checkpoint": {"monitor": "loss", "at_validation": False, "enabled": False}})  # no saves


@pytest.mark.parametrize("field", ["default_train_log_modes", "intermediates_log_modes"])
def test_per_example_modes_are_refused_for_every_train_metric(field):
    with pytest.raises(ConfigError, match="make_train_step") as info:
        from_dict(Config, {"train": {field: ["mean", "single_noreduce"]}})
    assert info.value.path == f"train.{field}"


def test_validation_sets_are_named_all_or_none():
    from xlstm_eqx.config.run import DataSection
    from xlstm_eqx.loop.run_data import named_validation_sets, split_paths

    named = DataSection(corpus="files", train_files=("t.txt",), validation_files=("a=x.txt", "b=y.txt", "a=z/w.txt"))
    assert named_validation_sets(named) == {"a": ["x.txt", "z/w.txt"], "b": ["y.txt"]}
    assert split_paths(named)[1] == ["x.txt", "y.txt", "z/w.txt"]
    plain = DataSection(corpus="files", train_files=("t.txt",), validation_files=("x.txt", "dir/a=b.txt"))
    assert named_validation_sets(plain) == {} and split_paths(plain)[1] == ["x.txt", "dir/a=b.txt"]
    with pytest.raises(ConfigError, match="name every entry"):
        DataSection(corpus="files", train_files=("t.txt",), validation_files=("a=x.txt", "y.txt"))
