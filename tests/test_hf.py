"""HuggingFace interop: logits and greedy generation equal transformers', both directions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import ROOT, resize
from helpers import assert_matches_transformers, hf_logits, run_cli, save_hf_model

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls

torch = pytest.importorskip("torch", reason="CPU torch (dev extra) is needed for HF checks")
transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is needed")

from llama_jax import api  # noqa: E402

VARIANTS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "llama3-rope": {"num_key_value_heads": 2, "rope_theta": 500000.0,
                    "max_position_embeddings": 16384,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    "tied": {"tie_word_embeddings": True},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


def tiny_hf(tmp_path, **extra):
    torch.manual_seed(0)
    settings = {"vocab_size": 211, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5, **extra}
    cfg = transformers.LlamaConfig(attn_implementation="eager", **settings)
    return save_hf_model(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "hf")


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_matches_transformers(tmp_path, variant):
    assert_matches_transformers(tiny_hf(tmp_path, **VARIANTS[variant]), tmp_path / "hf", 211)


def test_cli_round_trip_hf_orbax_hf(tmp_path):
    model = tiny_hf(tmp_path, num_key_value_heads=2)
    imported = run_cli("convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "run"))
    assert imported.returncode == 0, imported.stderr
    exported = run_cli("convert", "orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "back"))
    assert exported.returncode == 0, exported.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = np.random.default_rng(1).integers(0, 211, (2, 16))
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=1e-5)
    # The import is a run directory that eval accepts (params only), given a dataset: on
    # none it says so rather than report a loss on random tokens.
    refused = run_cli("eval", str(tmp_path / "run"), "--json", "--batches", "1")
    assert refused.returncode == 2
    assert "imported model with no dataset" in refused.stderr.strip().splitlines()[-1]
    result = run_cli("eval", str(tmp_path / "run"), "--json", "--batches", "1",
                     "data.seq_len=16", "data.dataset=synthetic")
    assert result.returncode == 0, result.stderr


def test_an_hf_folder_is_read_in_place(tmp_path, monkeypatch):
    """`api.load` (as eval, generate and lm-eval) reads an HF folder's tensors straight onto
    the mesh: nothing is written (each load used to leave a converted copy, the model's size,
    in /tmp), the folder is untouched, `model.*` and mesh overrides are taken, and a step
    other than its one is refused."""
    import tempfile

    from llama_jax.checkpoint import CheckpointError

    model = tiny_hf(tmp_path, num_key_value_heads=2)
    hf, scratch = tmp_path / "hf", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = {p: p.stat().st_mtime_ns for p in hf.rglob("*")}
    tokens = np.random.default_rng(3).integers(0, 211, (2, 24))
    ours = api.load(hf, ["mesh.fsdp=4", "mesh.tensor=2", "model.attention_block=8"])
    assert ours.cfg.model.attention_block == 8
    assert dict(ours.loaded.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    np.testing.assert_allclose(ours.logits(tokens), hf_logits(model, tokens),
                               atol=1e-4, rtol=1e-4)
    assert list(scratch.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in hf.rglob("*")} == before
    assert api.load(hf, step=0).loaded.step == 0
    with pytest.raises(CheckpointError, match="one set of weights"):
        api.load(hf, step=3)


def test_convert_takes_model_overrides(tmp_path):
    """`convert hf-to-orbax SRC DST model.a=b` writes the run with them (they were dropped:
    the HF model replaced the whole model section after the overrides)."""
    import jax

    tiny_hf(tmp_path)
    done = run_cli("convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "run"),
                   "model.attention_block=8", "model.param_dtype=bfloat16")
    assert done.returncode == 0, done.stderr
    loaded = api.load(tmp_path / "run")
    assert loaded.cfg.model.attention_block == 8
    assert {leaf.dtype.name for leaf in jax.tree.leaves(loaded.loaded.params)} == {"bfloat16"}


@pytest.mark.parametrize("damage, message", [
    ("no-config", "no config.json"),
    ("no-weights", "no *.safetensors weights"),
    ("not-llama", "only LLaMA"),
    ("missing-tensor", "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("bad-shape", "tensor model.norm.weight has shape (3,), expected (64,)"),
    ("bad-dtype", "dtype 'int8' cannot be represented"),
    ("torn-weights", "model.safetensors: not a readable safetensors file"),
])
def test_bad_hf_folders_are_refused_in_one_line(tmp_path, damage, message):
    from safetensors.numpy import load_file, save_file

    tiny_hf(tmp_path)
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    weights = hf / "model.safetensors"
    if damage == "no-config":
        (hf / "config.json").unlink()
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "not-llama":
        config["model_type"] = "mistral"
        config["architectures"] = ["MistralForCausalLM"]
    elif damage == "bad-dtype":
        config["torch_dtype"] = "int8"
        config.pop("dtype", None)
    elif damage == "torn-weights":  # a download cut short
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage in ("missing-tensor", "bad-shape"):
        tensors = load_file(str(weights))
        if damage == "missing-tensor":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        else:
            tensors["model.norm.weight"] = np.ones(3, np.float32)
        save_file(tensors, str(weights))
    if (hf / "config.json").is_file():
        (hf / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", "hf-to-orbax", str(hf), str(tmp_path / "out"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_failed_convert_leaves_nothing_and_a_retry_works(tmp_path):
    """A conversion that fails half-way (the last parameter read has a wrong shape) leaves no
    output folder; once the folder is fixed the same command succeeds; an existing output is
    never written into."""
    from safetensors.numpy import load_file, save_file

    tiny_hf(tmp_path)
    hf, out = tmp_path / "hf", tmp_path / "out"
    weights = hf / "model.safetensors"
    tensors = load_file(str(weights))
    # The stacked MLP norm is read last: everything else is written before it fails.
    broken = {**tensors, "model.layers.1.post_attention_layernorm.weight": np.ones(3, np.float32)}
    save_file(broken, str(weights))
    failed = run_cli("convert", "hf-to-orbax", str(hf), str(out))
    assert failed.returncode != 0
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    save_file(tensors, str(weights))
    done = run_cli("convert", "hf-to-orbax", str(hf), str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "checkpoints" / "0").is_dir() and (out / "config.yaml").is_file()
    again = run_cli("convert", "hf-to-orbax", str(hf), str(out))
    assert again.returncode != 0
    assert "already exists and is not empty" in again.stderr.strip().splitlines()[-1]
    exported = run_cli("convert", "orbax-to-hf", str(out), str(hf))
    assert exported.returncode != 0 and "already exists" in exported.stderr
    (tmp_path / "a-file").write_text("notes")
    onto_a_file = run_cli("convert", "orbax-to-hf", str(out), str(tmp_path / "a-file"))
    assert onto_a_file.returncode != 0
    assert f"{tmp_path / 'a-file'} is a file" in onto_a_file.stderr.strip().splitlines()[-1]
    assert (tmp_path / "a-file").read_text() == "notes"


def test_a_full_disk_fails_a_conversion_in_one_line_and_keeps_nothing(tmp_path, small_fs):
    """Both directions onto a disk too small: Orbax's and safetensors' write errors as one line
    that names the cause, and no partial output."""
    tiny_hf(tmp_path)
    assert run_cli("convert", "hf-to-orbax", str(tmp_path / "hf"),
                   str(tmp_path / "run")).returncode == 0
    resize(small_fs, "64k")
    for direction, src in [("hf-to-orbax", tmp_path / "hf"), ("orbax-to-hf", tmp_path / "run")]:
        done = run_cli("convert", direction, str(src), str(small_fs / "out"))
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert "No space left on device" in lines[0]
        assert list(small_fs.iterdir()) == []


@pytest.mark.parametrize("form", ["rope_parameters", "legacy"])
def test_both_config_json_rope_forms(tmp_path, form):
    model = tiny_hf(tmp_path, **VARIANTS["llama3-rope"])
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        config.pop(key, None)
    if form == "legacy":  # as in the published Llama 3.1 checkpoints
        config.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    else:  # as transformers 5 writes
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    path.write_text(json.dumps(config))
    tokens = np.random.default_rng(2).integers(0, 211, (1, 40))
    np.testing.assert_allclose(api.load(tmp_path / "hf").logits(tokens),
                               hf_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_import_memory_does_not_grow_with_the_model():
    """The import streams one parameter at a time into Orbax partial saves: quadrupling the
    layers (and the bytes) of a multi-shard model adds to the converter's peak memory about
    the added bytes (0.9-1.2x measured: the stacked leaves in flight grow with the
    layers too), where the old whole-model assembly added about 3.5x them."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_convert_memory import measure

    small, large = measure(layers=16), measure(layers=64)
    assert large["shards"] >= 10
    added_bytes = large["model_bytes"] - small["model_bytes"]
    assert large["growth_bytes"] - small["growth_bytes"] < 1.6 * added_bytes
    assert large["growth_bytes"] < 1.6 * large["model_bytes"]


@pytest.mark.parametrize("variant", ["gqa", "biases"])
@pytest.mark.parametrize("block", [0, 8], ids=["one-einsum", "causal-blocks"])
def test_gradients_match_transformers(tmp_path, variant, block):
    """Every parameter's gradient of the mean next-token loss equals torch autograd's through
    `LlamaForCausalLM`: an independent check of the hand-written backwards (projections,
    attention, MLP) that the logits tests cannot see."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.convert import params_to_hf

    model = tiny_hf(tmp_path, **VARIANTS[variant])
    tokens = np.random.default_rng(2).integers(0, 211, (2, 21))
    model.train()
    model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
    expected = {name: p.grad.numpy() for name, p in model.named_parameters()}

    ours = api.load(tmp_path / "hf", [f"model.attention_block={block}"])
    graphdef = ours.loaded.setup.graphdef

    def loss(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(tokens))[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(ours.loaded.params)
    got = params_to_hf(grads, ours.cfg.model)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, atol=2e-5, rtol=1e-3, err_msg=name)
