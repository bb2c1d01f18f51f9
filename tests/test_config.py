"""Config loading: presets, bases, overrides, and one-line refusals of bad settings."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import CONFIGS
from helpers import run_cli

from llama_jax.config import config_from_yaml_text, load_config, to_yaml
from llama_jax.errors import ConfigError

# Each published model's facts, as its reference config.json states them (Meta's and
# EleutherAI's releases on the Hugging Face hub): shapes, attention heads, position encoding,
# normalisation and activation.
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "position": "rope", "rotary_pct": 1.0,
         "parallel_residual": False}
NEOX = {"norm": "layernorm", "activation": "gelu", "position": "rope", "rotary_pct": 0.25,
        "parallel_residual": True, "tie_embeddings": False}
L2 = {**LLAMA, "vocab_size": 32000, "rope_theta": 10000.0, "max_position_embeddings": 4096,
      "tie_embeddings": False, "rope_scaling.type": "none"}
L3 = {**LLAMA, "vocab_size": 128256, "rope_theta": 500000.0}
PUBLISHED_FACTS = {
    "llama2-7b": {**L2, "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "kv_heads": 32,
                  "intermediate_size": 11008},
    "llama2-13b": {**L2, "hidden_size": 5120, "num_layers": 40, "num_heads": 40,
                   "kv_heads": 40, "intermediate_size": 13824},
    "llama2-70b": {**L2, "hidden_size": 8192, "num_layers": 80, "num_heads": 64, "kv_heads": 8,
                   "intermediate_size": 28672},
    "llama3-8b": {**L3, "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "kv_heads": 8,
                  "intermediate_size": 14336, "max_position_embeddings": 8192,
                  "rope_scaling.type": "none", "tie_embeddings": False},
    "llama3-70b": {**L3, "hidden_size": 8192, "num_layers": 80, "num_heads": 64, "kv_heads": 8,
                   "intermediate_size": 28672, "max_position_embeddings": 8192,
                   "rope_scaling.type": "none"},
    "llama3.1-8b": {**L3, "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
                    "kv_heads": 8, "intermediate_size": 14336,
                    "max_position_embeddings": 131072, "rope_scaling.type": "llama3",
                    "rope_scaling.factor": 8.0, "rope_scaling.low_freq_factor": 1.0,
                    "rope_scaling.high_freq_factor": 4.0,
                    "rope_scaling.original_max_position_embeddings": 8192},
    "llama3.2-1b": {**L3, "hidden_size": 2048, "num_layers": 16, "num_heads": 32,
                    "kv_heads": 8, "intermediate_size": 8192, "tie_embeddings": True,
                    "max_position_embeddings": 131072, "rope_scaling.type": "llama3",
                    "rope_scaling.factor": 32.0, "rope_scaling.low_freq_factor": 1.0,
                    "rope_scaling.high_freq_factor": 4.0,
                    "rope_scaling.original_max_position_embeddings": 8192},
    "pythia-1b": {**NEOX, "vocab_size": 50304, "hidden_size": 2048, "num_layers": 16,
                  "num_heads": 8, "kv_heads": 8, "intermediate_size": 8192,
                  "max_position_embeddings": 2048, "rope_theta": 10000.0,
                  "attention_bias": True, "mlp_bias": True},
    # The rest of the Pythia suite (HF EleutherAI/pythia-* config.json): d, layers, heads, vocab.
    **{f"pythia-{size}": {**NEOX, "vocab_size": vocab, "hidden_size": d, "num_layers": layers,
                          "num_heads": heads, "kv_heads": heads, "intermediate_size": 4 * d,
                          "max_position_embeddings": 2048, "rope_theta": 10000.0,
                          "attention_bias": True, "mlp_bias": True}
       for size, d, layers, heads, vocab in (
           ("70m", 512, 6, 8, 50304), ("160m", 768, 12, 12, 50304),
           ("410m", 1024, 24, 16, 50304), ("1.4b", 2048, 24, 16, 50304),
           ("2.8b", 2560, 32, 32, 50304), ("6.9b", 4096, 32, 32, 50432),
           ("12b", 5120, 36, 40, 50688))},
    "gpt-neox-20b": {**NEOX, "vocab_size": 50432, "hidden_size": 6144, "num_layers": 44,
                     "num_heads": 64, "kv_heads": 64, "intermediate_size": 24576,
                     "max_position_embeddings": 2048, "rope_theta": 10000.0,
                     "attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads_and_published_ones_match_their_release(name):
    m = load_config(CONFIGS / f"{name}.yaml").model
    assert m.hidden_size % m.num_heads == 0
    for key, value in PUBLISHED_FACTS.get(name, {}).items():
        node = m
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, (name, key, node, value)


def test_published_facts_cover_every_published_preset():
    ours = {"tiny", "default", "bench-small"}
    assert set(PUBLISHED_FACTS) == {p.stem for p in CONFIGS.glob("*.yaml")} - ours


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
        ("model.max_segments_per_row=1", "model.max_segments_per_row=1 must be 0 (packed "
                                         "rows never reach cuDNN) or at least 2"),
        ("model.max_segments_per_row=-3", "model.max_segments_per_row=-3 must be 0"),
        ("data.synthetic_document_tokens=-1", "data.synthetic_document_tokens=-1 must be >= 0"),
        ("optimizer.b2=1.0", "optimizer.b2=1.0 must be in [0, 1)"),
        ("model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 4}",
         "model.rope_scaling.high_freq_factor=4.0 must exceed model.rope_scaling.low_freq_"),
        ("train.seed=4294967296", "train.seed=4294967296 must be in [0, 2**31)"),
        ("distributed.process_id=-2", "distributed.process_id=-2 must be -1 (from the "
                                      "environment) or in [0, distributed.num_processes)"),
    ],
)
def test_bad_settings_are_refused_with_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


# Settings where -1 means something (fill the mesh axis from the device count; take the
# process id from the environment).
MINUS_ONE_MEANS_SOMETHING = {"mesh.data", "mesh.fsdp", "mesh.sequence", "mesh.tensor",
                             "distributed.process_id"}


def _numeric_settings(node: object, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _numeric_settings(value, f"{prefix}{f.name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            keys.append(prefix + f.name)
    return keys


def test_no_numeric_setting_takes_minus_one_without_a_word():
    """-1 is refused in one line naming the key wherever it means nothing (a negative
    checkpoint.keep, train.seed or optimizer.b2 reached a library's traceback, or worse)."""
    keys = _numeric_settings(load_config(CONFIGS / "tiny.yaml"))
    assert "checkpoint.keep" in keys and "optimizer.b2" in keys and len(keys) > 50
    for key in sorted(set(keys) - MINUS_ONE_MEANS_SOMETHING):
        with pytest.raises(ConfigError) as e:
            load_config(CONFIGS / "tiny.yaml", [f"{key}=-1"])
        assert key in str(e.value) and "\n" not in str(e.value)


def test_synthetic_documents_need_the_synthetic_dataset():
    with pytest.raises(ConfigError, match="data.synthetic_document_tokens packs synthetic "
                                          "documents: it needs data.dataset=synthetic"):
        load_config(CONFIGS / "tiny.yaml", ["data.dataset=python_docs",
                                            "data.synthetic_document_tokens=100"])


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


@pytest.mark.parametrize("inside, hint", [
    ("config.yaml", "the run's config is {folder}/config.yaml"),
    ("config.json", "an HF folder: `llama-jax convert hf-to-orbax`"),
    ("", "")])
def test_a_folder_named_as_the_config_says_what_it_is(tmp_path, inside, hint):
    """`llama-jax info runs/x` (a run directory, or an HF folder) where a YAML file goes: one
    line that says which file to name, not "config file not found"."""
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    if inside:
        (folder / inside).write_text("{}")
    with pytest.raises(ConfigError) as refused:
        load_config(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder} is a folder, not a config file")
    assert hint.format(folder=folder) in message and (inside or message.endswith("file"))


def test_every_remat_choice_has_a_policy_and_every_policy_is_a_choice():
    import typing

    from llama_jax.config import Remat
    from llama_jax.model import REMAT_POLICIES

    assert set(REMAT_POLICIES) == set(typing.get_args(Remat)) - {"none"}
