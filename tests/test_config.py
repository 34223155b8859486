from pathlib import Path

import pytest
import yaml

from dist_llm.cli import main
from dist_llm.config import ConfigError, config_from_dict, config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_is_valid(path):
    if path.parent.name == "model":  # model presets alone are valid configs too
        assert load_config(path).model.dim > 0
    else:
        load_config(path)


def test_base_chain_and_overrides():
    config = load_config(
        CONFIGS / "quickstart.yaml", ["train.steps=70", "optim.lr=0.5", "data.sources.0.weight=2"]
    )
    assert config.model.dim == 512  # from model/small.yaml via base:
    assert config.parallel.zero_stage == 2  # from quickstart.yaml
    assert config.train.steps == 70 and config.optim.lr == 0.5
    assert config.data.sources[0].weight == 2.0
    assert config.train.micro_batch_size == 8


def test_round_trip_through_dict():
    config = load_config(CONFIGS / "tiny.yaml")
    assert config_from_dict(config_to_dict(config)) == config


def _error(tmp_path, text, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value), str(path)


def test_unknown_section(tmp_path):
    message, path = _error(tmp_path, "modle:\n  dim: 5\n")
    assert "modle: unknown key" in message and "did you mean 'model'" in message and path in message


def test_wrong_type_is_not_coerced(tmp_path):
    message, path = _error(tmp_path, "train:\n  steps: '100'\n")
    assert "train.steps" in message and "valid integer" in message and path in message
    message, _ = _error(tmp_path, "train:\n  steps: 2.5\n")
    assert "train.steps" in message


def test_impossible_values(tmp_path):
    message, path = _error(tmp_path, "optim:\n  lr: -1.0\n")
    assert "optim.lr" in message and "greater than 0" in message and path in message
    message, _ = _error(tmp_path, "train:\n  dtype: fp8\n")
    assert "train.dtype" in message and "'fp32'" in message


def test_cross_field_rules_name_the_setting_to_change(tmp_path):
    message, _ = _error(tmp_path, "model:\n  dim: 100\n  n_heads: 8\n")
    assert "model.dim: 100 is not divisible by model.n_heads=8" in message
    message, _ = _error(tmp_path, "parallel:\n  zero_stage: 0\ntrain:\n  dtype: bf16\n")
    assert "parallel.zero_stage" in message and "ZeRO-0" in message
    message, _ = _error(tmp_path, "parallel:\n  pipeline: 2\n  zero_stage: 3\n")
    assert "parallel.zero_stage: 3 with parallel.pipeline=2: set 1" in message
    message, _ = _error(tmp_path, "model:\n  n_heads: 8\n  n_kv_heads: 3\n")
    assert "model.n_kv_heads: 3 must divide model.n_heads=8" in message


def test_override_errors_say_command_line(tmp_path):
    message, _ = _error(tmp_path, "train:\n  steps: 5\n", ["train.stepz=3"])
    assert "train.stepz: unknown key" in message and "[command line]" in message
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="has no item 3"):
        load_config(None, ["data.sources.3.path=x"])


def test_cli_config_show(capsys):
    assert main(["config", "show", "--config", str(CONFIGS / "tiny.yaml"), "train.steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 3 and shown["model"]["dim"] == 64
    assert main(["config", "show", "--config", str(CONFIGS / "tiny.yaml"), "train.steps=x"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_yaml_scientific_floats_and_more_rules(tmp_path):
    config = load_config(None, ["optim.lr=1e-4", "optim.min_lr=1e-5"])
    assert config.optim.lr == 1e-4 and config.optim.min_lr == 1e-5
    message, _ = _error(tmp_path, "optim:\n  beta2: 1.0\n")
    assert "optim.beta2" in message and "less than 1" in message
    message, _ = _error(
        tmp_path, "parallel:\n  zero_stage: 0\n  offload_optimizer: true\ntrain:\n  dtype: fp32\n"
    )
    assert "parallel.offload_optimizer" in message
    message, path = _error(tmp_path, "base: 3\n")
    assert "'base' must be a file name" in message and path in message
    message, _ = _error(tmp_path, "optim:\n  lr: .inf\n")
    assert "optim.lr" in message
