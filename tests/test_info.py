"""Parameter counts against published figures, and the FLOPs / MFU formulas by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig

import jax
import pytest
from conftest import CONFIGS
from helpers import ROOT, run_cli

from llama_jax import flops
from llama_jax.config import load_config

PUBLISHED = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "gpt-neox-20b": 20_554_567_680,
}


@pytest.mark.parametrize("preset, published", PUBLISHED.items())
def test_published_parameter_counts(preset, published):
    assert flops.count_params(load_config(CONFIGS / f"{preset}.yaml").model).total == published


def test_info_json_cli():
    result = run_cli("info", "configs/llama2-7b.yaml", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["params"] == PUBLISHED["llama2-7b"]
    assert info["state_bytes"] == info["param_bytes"] + info["optimizer_bytes"]
    # fp32 params + AdamW mu and nu in fp32: 12 bytes per parameter (+ two step counters).
    assert abs(info["state_bytes"] - 12 * info["params"]) < 64


def test_flops_per_token_llama2_7b_by_hand():
    cfg = load_config(CONFIGS / "llama2-7b.yaml").model
    d, f, n, h, v, s, L = 4096, 11008, 32, 128, 32000, 4096, 32
    per_layer = 2 * d * 3 * n * h + 2 * n * h * d + 2 * s * n * h + 2 * d * f * 3
    assert flops.flops_per_token(cfg, s) == 3 * (L * per_layer + 2 * d * v)
    # Cross-check with the 6N + attention rule of thumb (N = non-embedding + LM head).
    n_matmul = flops.count_params(cfg).non_embedding - (2 * L + 1) * d + d * v
    assert flops.flops_per_token(cfg, s) == pytest.approx(6 * n_matmul + 6 * L * s * n * h)


def test_flops_per_token_gqa_and_gelu_by_hand():
    llama3 = load_config(CONFIGS / "llama3-8b.yaml").model
    d, f, n, k, h, v, L, s = 4096, 14336, 32, 8, 128, 128256, 32, 2048
    per_layer = 2 * d * (n + 2 * k) * h + 2 * n * h * d + 2 * s * n * h + 2 * d * f * 3
    assert flops.flops_per_token(llama3, s) == 3 * (L * per_layer + 2 * d * v)
    pythia = load_config(CONFIGS / "pythia-1b.yaml").model
    d, f, n, h, v, L, s = 2048, 8192, 8, 256, 50304, 16, 2048
    per_layer = 2 * d * 3 * n * h + 2 * n * h * d + 2 * s * n * h + 2 * d * f * 2
    assert flops.flops_per_token(pythia, s) == 3 * (L * per_layer + 2 * d * v)


@pytest.mark.usefixtures("unsharded")
@pytest.mark.parametrize("arch", [[], ["model.norm=layernorm", "model.activation=gelu",
                                       "model.parallel_residual=true", "model.rotary_pct=0.25"]],
                         ids=["llama", "neox"])
def test_flops_per_token_against_xla_cost_analysis(arch):
    """Our formula against XLA's own count of a compiled forward (2 layers unrolled, so the
    loop body is not counted once for all layers). Convention: we count causal attention as
    half of QK^T and AV, XLA counts the full T x T einsum the xla kernel computes, so that
    half is added back; XLA also counts elementwise work (norms, softmax, activations) that
    we leave out: a few percent. The backward is about twice the forward (our x3)."""
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.model import Transformer

    m = load_config(CONFIGS / "tiny.yaml", [
        "model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=704", "model.num_layers=2", "model.vocab_size=1024",
        "model.attention=xla", "model.attention_block=0", "model.scan_layers=false", *arch]).model
    graphdef, state = nnx.split(Transformer(m, nnx.Rngs(0)))
    b, t = 2, 128
    tokens = jnp.zeros((b, t), jnp.int32)

    def xla_flops(fn) -> float:  # noqa: ANN001
        cost = jax.jit(fn).lower(state, tokens).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    forward = xla_flops(lambda s, x: nnx.merge(graphdef, s)(x))
    ours = flops.flops_per_token(m, t) / 3 * b * t
    other_causal_half = 2 * t * m.num_heads * m.head_size * m.num_layers * b * t
    assert 1.0 <= forward / (ours + other_causal_half) < 1.05
    both = xla_flops(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x))))
    assert 2.7 < both / forward < 3.05


def test_mfu_formula():
    # 1000 tok/s x 6e9 FLOP/token on a 989 TFLOP/s chip.
    assert flops.mfu(1000.0, 6e9, 989e12) == pytest.approx(6e12 / 989e12)


def test_bench_cli_reports_the_figures():
    result = run_cli("bench", "configs/tiny.yaml", "--steps", "2", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_sec", "step_time_s", "compile_s", "mfu", "peak_flops"):
        assert out[key] > 0, key
    tokens = 8 * 64  # tiny: global batch 8, seq 64
    assert out["tokens_per_sec"] == pytest.approx(tokens / out["step_time_s"])
    assert out["mfu"] == pytest.approx(out["tokens_per_sec"] * out["flops_per_token"]
                                       / out["peak_flops"])


def test_bench_table_sets_the_step_against_its_roofline_where_the_chip_is_known():
    """On a GPU or TPU in the chip table `bench` has the roofline of its own program; the
    table says it and how much of its speed the measured step reached. CPU devices have
    none (their rates are measured by `plan`), and the table says nothing of it."""
    from llama_jax.cli import bench_rows

    gpu = {"device": "1 x NVIDIA H200", "compile_s": 30.0, "step_time_s": 0.7,
           "step_time_min_s": 0.69, "step_time_max_s": 0.71, "tokens_per_sec": 70216.0,
           "flops_per_token": 7.82e9, "peak_flops": 989e12, "peak_source": "chip table",
           "mfu": 0.555, "predicted_step_s": 0.4593}
    rows = dict(bench_rows(gpu, 6))
    assert rows["roofline step (this program at the chip's peaks)"] == (
        "459.3 ms; the measured step reached 66% of its speed")
    assert rows["step time (median of 6)"].startswith("700.0 ms")
    cpu = {k: v for k, v in gpu.items() if k != "predicted_step_s"}
    assert not any(label.startswith("roofline") for label, _ in bench_rows(cpu, 6))


def test_compile_only_needs_no_parameters():
    """2 layers of 7B width (2.7 GB of fp32 parameters, 8 GB with AdamW) compile from
    abstract shapes: the process's peak memory stays far below the parameters' size."""
    args = ["configs/llama2-7b.yaml", "model.num_layers=2", "train.global_batch_size=8",
            "data.seq_len=128"]
    # A fresh parent whose only child is the bench, so RUSAGE_CHILDREN is that child's peak.
    probe = ("import json, resource, subprocess, sys; "
             "r = subprocess.run([sys.executable, '-m', 'llama_jax.cli', 'bench', *sys.argv[1:], "
             "'--compile-only'], capture_output=True, text=True); "
             "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr[-2000:], "
             "'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    result = json.loads(done.stdout)
    assert result["rc"] == 0, result["err"]
    out = json.loads(result["out"].strip().splitlines()[-1])
    assert out["compile_s"] > 0 and out["compiled_per_device_gib"] > 0
    param_bytes = flops.state_bytes(load_config(CONFIGS / "llama2-7b.yaml", args[1:]))["params"]
    assert result["peak"] < param_bytes / 2, (result["peak"], param_bytes)


def test_presets_by_name_file_and_base_after_a_wheel_install(tmp_path):
    """A non-editable install used from another folder still finds every preset."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "llama_jax", source / "llama_jax", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("llama_jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", wheel],
                   check=True, capture_output=True, timeout=300)
    # The dependencies come from the test environment's site-packages, as a plain path (its
    # editable-install hook for this checkout is not processed from there).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("base: tiny\nmodel:\n  num_layers: 3\n")

    def info(config: str) -> dict:
        done = subprocess.run([venv / "bin" / "llama-jax", "info", config, "--json"],
                              capture_output=True, text=True, cwd=elsewhere, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    where = subprocess.run([venv / "bin" / "python", "-c",
                            "import llama_jax; print(llama_jax.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True)
    assert where.stdout.startswith(str(site)), where.stdout
    assert info("llama3-8b")["params"] == PUBLISHED["llama3-8b"]
    assert info("llama3-8b.yaml")["params"] == PUBLISHED["llama3-8b"]
    expected = flops.count_params(load_config(CONFIGS / "tiny.yaml", ["model.num_layers=3"]).model)
    assert info("tiny")["params"] != expected.total
    assert info("mine.yaml")["params"] == expected.total
    done = subprocess.run([venv / "bin" / "llama-jax", "info", "llama3-8x"], capture_output=True,
                          text=True, cwd=elsewhere, timeout=300)
    assert done.returncode == 2 and "no preset is named 'llama3-8x'" in done.stderr
    assert "llama3-8b" in done.stderr and "Traceback" not in done.stderr


def test_info_by_path_in_a_checkout():
    assert json.loads(run_cli("info", "configs/llama3-8b.yaml", "--json").stdout)["params"] == (
        PUBLISHED["llama3-8b"])
