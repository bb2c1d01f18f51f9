"""Config loading: presets, bases, overrides, and one-line refusals of bad settings."""

from __future__ import annotations

import pytest
from conftest import CONFIGS
from helpers import run_cli

from llama_jax.config import config_from_yaml_text, load_config, to_yaml
from llama_jax.errors import ConfigError


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0


def test_base_and_overrides_layer_in_order():
    cfg = load_config(CONFIGS / "llama2-70b.yaml", ["model.num_layers=3", "optimizer.lr=1e-3"])
    assert cfg.model.vocab_size == 32000  # from the base llama2-7b
    assert cfg.model.num_kv_heads == 8  # from llama2-70b itself
    assert cfg.model.num_layers == 3 and cfg.optimizer.lr == 1e-3  # overrides win


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS / "pythia-1b.yaml", ["train.steps=7"])
    assert config_from_yaml_text(to_yaml(cfg)) == cfg


def test_rule_override_changes_one_rule_only():
    cfg = load_config(CONFIGS / "tiny.yaml", ["mesh.rules.embed=[tensor]"])
    assert cfg.mesh.rules["embed"] == ["tensor"]
    assert cfg.mesh.rules["batch"] == ["data", "fsdp"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.hiden_size=64",
         "unknown config key 'model.hiden_size' (closest valid: hidden_size"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("model.num_layers=abc", "model.num_layers"),
        ("model.num_heads=5", "model.num_heads=5 does not divide model.hidden_size=128"),
        ("model.num_kv_heads=3", "model.num_kv_heads=3 does not divide model.num_heads=4"),
        ("model.norm=batchnorm", "model.norm='batchnorm' is not one of: rmsnorm, layernorm"),
        ("model.compute_dtype=int8", "model.compute_dtype='int8'"),
        ("train.steps=0", "train.steps=0 must be positive"),
        ("mesh.rules.embedd=[fsdp]", "unknown logical axis 'embedd' (closest valid: embed"),
        ("mesh.rules.embed=[fsd]", "unknown mesh axis 'fsd'"),
        ("model.rotary_pct=1.5", "model.rotary_pct=1.5"),
    ],
)
def test_bad_settings_are_refused_with_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nmodel:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.num_layer' "
                                          r"\(closest valid: num_layers"):
        load_config(bad)


def test_unknown_base_suggests_presets(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: llama2-7bb\n")
    with pytest.raises(ConfigError, match="did you mean: llama2-7b"):
        load_config(bad)


@pytest.mark.parametrize("override", ["model.hiden_size=64", "model.num_heads=5",
                                      "model.num_layers=abc"])
def test_cli_refuses_bad_config_in_one_line(override):
    result = run_cli("info", "configs/tiny.yaml", override)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr


def test_cli_refuses_missing_file():
    result = run_cli("info", "configs/nope.yaml")
    assert result.returncode != 0
    assert "config file not found: configs/nope.yaml" in result.stderr
