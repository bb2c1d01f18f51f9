"""GPT-NeoX (Pythia) interop: logits and greedy generation equal transformers'
GPTNeoXForCausalLM, and HF -> ours -> HF gives the same tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_matches_transformers, hf_logits, run_cli, save_hf_model

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls

torch = pytest.importorskip("torch", reason="CPU torch (dev extra) is needed for HF checks")
transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is needed")


VARIANTS = {
    "parallel-partial-rotary": {"use_parallel_residual": True, "rotary_pct": 0.25},
    "sequential-full-rotary": {"use_parallel_residual": False, "rotary_pct": 1.0},
    "no-attention-bias-half-rotary": {"attention_bias": False, "rotary_pct": 0.5,
                                      "rotary_emb_base": 500.0},
}


def tiny_neox(tmp_path, rotary_pct=0.25, rotary_emb_base=10000.0, **extra):
    torch.manual_seed(0)
    settings = {"vocab_size": 211, "hidden_size": 64, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 256, "layer_norm_eps": 1e-5,
                "rope_parameters": {"rope_type": "default", "rope_theta": rotary_emb_base,
                                    "partial_rotary_factor": rotary_pct}, **extra}
    cfg = transformers.GPTNeoXConfig(attn_implementation="eager", **settings)
    return save_hf_model(transformers.GPTNeoXForCausalLM(cfg).eval(), tmp_path / "hf")


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_matches_transformers(tmp_path, variant):
    model = tiny_neox(tmp_path, **VARIANTS[variant])
    ours = assert_matches_transformers(model, tmp_path / "hf", 211)
    assert (ours.cfg.model.norm, ours.cfg.model.activation) == ("layernorm", "gelu")


def test_legacy_config_keys_and_round_trip(tmp_path):
    """The published Pythia config.json spells rotary as `rotary_pct` / `rotary_emb_base`;
    the CLI round trip HF -> ours -> HF gives identical tensors."""
    from safetensors.numpy import load_file

    model = tiny_neox(tmp_path, use_parallel_residual=False, rotary_pct=0.5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    imported = run_cli("convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert imported.returncode == 0, imported.stderr
    exported = run_cli("convert", "orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "back"))
    assert exported.returncode == 0, exported.stderr
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded).__name__ == "GPTNeoXForCausalLM"
    tokens = np.random.default_rng(1).integers(0, 211, (2, 16))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-6)


def test_unsupported_neox_settings_are_refused(tmp_path):
    tiny_neox(tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config,
                                                             "hidden_act": "gelu_new"}))
    result = run_cli("convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "hidden_act='gelu_new'; only the exact GELU (gelu)" in line
    assert not (tmp_path / "run").exists()
