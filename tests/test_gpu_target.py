"""GPUs compiled for from this CPU-only machine (`--topology h100`, `make gpu-compile`): names,
the per-GPU memory of the 1B step, sweeps over eight GPUs and two nodes, and the programs
XLA:GPU makes of the fast paths (the sliced LM head's accumulation, the one-pass loss)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli

from llama_jax.config import load_config
from llama_jax.errors import ConfigError
from llama_jax.gpu_target import (
    ENV_CUDA_PLUGIN,
    GpuNodes,
    cuda_plugin_folder,
    cuda_plugin_requirements,
    target_config,
)
from llama_jax.hlo_cost import parse_module, program_items
from llama_jax.topology import parse_topology

ONE_B = ["model.compute_dtype=bfloat16", "data.seq_len=2048", "mesh.fsdp=1",
         "model.attention=cudnn", "model.remat=projections_and_attention"]


@pytest.mark.parametrize(("name", "kind", "gpus", "nodes"), [
    ("h100", "h100", 1, 1), ("H200:8", "h200", 8, 1), ("2xh100:8", "h100", 8, 2),
    ("a100:4", "a100", 4, 1)])
def test_gpu_names(name, kind, gpus, nodes):
    target = parse_topology(name)
    assert target == GpuNodes(kind, gpus, nodes)
    assert (target.chips, target.num_slices) == (gpus * nodes, nodes)


@pytest.mark.parametrize("name", ["h100:0", "h100:9", "h300", "0xh100:8", "h100:2x2"])
def test_bad_gpu_names(name):
    with pytest.raises(ConfigError):
        parse_topology(name)


def test_target_config_describes_the_chip_table_gpu():
    text = target_config("h200")
    assert "memory_bandwidth: 4800000000000" in text and "core_count: 132" in text
    assert "major: 9 minor: 0" in text and 'device_description_str: "NVIDIA H200"' in text


def test_a_gpu_target_without_the_plugin_is_refused_in_one_line(tmp_path):
    if any(importlib.util.find_spec(f"jax_cuda{major}_plugin") for major in (12, 13)):
        pytest.skip("this environment has a CUDA plugin of its own (a GPU machine)")
    result = run_cli("bench", "configs/tiny.yaml", "--topology", "h100",
                     env={ENV_CUDA_PLUGIN: str(tmp_path / "none")})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "make gpu-compile" in lines[0], result.stderr


@pytest.fixture(scope="module")
def cuda_plugin(tmp_path_factory) -> Path:
    """The plugin `make gpu-compile` installed beside the environment, else one downloaded for
    the test (skipped only when neither is possible)."""
    if (cuda_plugin_folder() / "jax_plugins").is_dir():
        return cuda_plugin_folder()
    target = tmp_path_factory.mktemp("cuda-plugin")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(target), *cuda_plugin_requirements()],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"cannot install the CUDA plugin: {done.stderr.strip().splitlines()[-1:]}")
    return target


def _bench(plugin: Path, config: str, topology: str, *overrides: str) -> dict:
    result = run_cli("bench", config, "--topology", topology, *overrides,
                     env={ENV_CUDA_PLUGIN: str(plugin)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_1b_step_compiled_for_an_h100(cuda_plugin):
    """Llama 3.2 1B at batch 16 x 2048 fits one H100's 80 GB, with cuDNN's forward kept
    for the backward (one forward call in the layer loop, not two) and the whole LM head in
    fp8 where asked; batch 64 does not fit."""
    fits = _bench(cuda_plugin, "configs/llama3.2-1b.yaml", "h100", *ONE_B,
                  "train.global_batch_size=16", "model.quantization=fp8", "model.fp8_head=true")
    assert fits["device"] == "1 x NVIDIA H100 80GB HBM3 (h100:1, compile only)"
    assert fits["device_memory_gib"] == pytest.approx(80e9 / 2**30)
    assert fits["fits"] is True and 20 < fits["compiled_per_device_gib"] < 74
    assert fits["custom_calls"]["__cudnn$fmhaSoftmax"] == 1
    assert fits["custom_calls"]["__cudnn$fmhaSoftmaxBackward"] == 1
    assert fits["fp8_matmuls"] >= 7 * 3 + 3  # every projection's three products, the head's
    # priced at the fp8 peak: all matmul FLOPs but attention's (cuDNN's, in bf16)
    assert 0.75 < fits["hlo_fp8_flops_per_device"] / fits["hlo_flops_per_device"] < 0.97
    assert fits["predicted_step_s"] > 0
    big = _bench(cuda_plugin, "configs/llama3.2-1b.yaml", "h100", *ONE_B,
                 "train.global_batch_size=64")
    assert big["fits"] is False and big["compiled_per_device_gib"] > 80e9 / 2**30


def test_what_the_gpu_refuses_is_one_line(cuda_plugin):
    """cuDNN's attention takes no float32: a config error, said in one line (not JAX's
    traceback), with the target named."""
    result = run_cli("bench", "configs/tiny.yaml", "--topology", "h100", "model.attention=cudnn",
                     env={ENV_CUDA_PLUGIN: str(cuda_plugin)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "cannot compile the step for h100:1" in lines[0] and "float32" in lines[0]


_COLLECTIVES = """
import collections, json, re, sys
from llama_jax.topology import prepare_compile_only
target = prepare_compile_only("h100:8")
import jax, numpy as np
from llama_jax.config import load_config
from llama_jax.sharding import make_mesh
from llama_jax.step import make_setup, make_train_step
from llama_jax.topology import topology_devices
cfg = load_config("configs/tiny.yaml", ["model.compute_dtype=bfloat16", "mesh.fsdp=8",
                                        *sys.argv[1:]])
setup = make_setup(cfg, make_mesh(cfg, topology_devices(target)))
rows, length = cfg.train.global_batch_size, cfg.data.seq_len
batch = {k: jax.ShapeDtypeStruct((rows, length), np.float32 if k == "weights" else np.int32,
                                 sharding=s) for k, s in setup.batch_shardings().items()}
text = make_train_step(setup).lower(setup.abstract_state, batch).compile().as_text()
ops, results = collections.Counter(), collections.defaultdict(list)
for line in text.splitlines():
    op = re.search(r"= (.*?) (reduce-scatter|all-reduce|all-gather)(-start)?\\(", line)
    if op:
        shapes = re.findall(r"(\\w+)\\[([0-9,]*)\\]", op.group(1))
        if op.group(3):  # an async start's value: (operands, results)
            shapes = shapes[len(shapes) // 2:]
        for t, dims in shapes:
            ops[f"{op.group(2)} {t}"] += 1
            results[f"{op.group(2)} {t}"].append([int(d) for d in dims.split(",") if d])
print(json.dumps({"ops": ops, "results": results}))
"""


def _collectives(cuda_plugin: Path, *overrides: str) -> dict:
    """The tiny model's train step compiled for eight H100s under fsdp=8, by collective and
    dtype (`"all-gather bf16"`): `ops`, how many results carry it; `results`, their shapes."""
    done = subprocess.run([sys.executable, "-c", _COLLECTIVES, *overrides], cwd=ROOT,
                          env={**os.environ, ENV_CUDA_PLUGIN: str(cuda_plugin)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gradients_are_summed_across_gpus_in_float32_unless_asked(cuda_plugin):
    """Under bf16 compute XLA:GPU sums a weight gradient across devices in the dtype its
    product leaves in (bf16; CPU devices upcast, so only a GPU program shows it):
    `model.grad_reduce_dtype=float32` (the default, as torchtitan) makes every weight
    gradient, the embedding table's scatter-add included, reduce in float32; `compute`
    leaves the matmuls' bf16."""
    f32 = _collectives(cuda_plugin)["ops"]
    compute = _collectives(cuda_plugin, "model.grad_reduce_dtype=compute")["ops"]
    reductions = ("reduce-scatter", "all-reduce")
    # 4 layers x 7 projections and the tables (XLA combines some into one reduce-scatter of
    # a tuple); the scalars (loss, token count, norms) are all-reduced in float32
    assert f32.get("reduce-scatter f32", 0) >= 8, f32
    assert not any(k.endswith("bf16") for k in f32 if k.startswith(reductions)), f32
    assert compute.get("reduce-scatter bf16", 0) >= 7, compute
    assert compute.get("reduce-scatter f32", 0) == 0, compute


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_fp8_weights_are_gathered_across_gpus_in_fp8(cuda_plugin, scaling):
    """Under fsdp each GPU quantises its shard of a block's weight and the shards are
    gathered in fp8, half the bytes of bf16 (what torchtitan's float8 all-gather does by
    hand): XLA moves the cast before the gather, current scaling's amax being a reduction
    of the shards' amaxes. Only the vocabulary tables (the embedding and the head, not in
    fp8) are gathered in bf16. Layers unrolled, so each weight's gathers appear in the
    program as often as they run."""
    fp8 = _collectives(cuda_plugin, "model.quantization=fp8", f"model.fp8_scaling={scaling}",
                       "model.scan_layers=false")["results"]
    m = load_config(ROOT / "configs/tiny.yaml").model
    kv = m.num_kv_heads * m.hidden_size // m.num_heads
    # q and o, k and v, the MLP's three
    block_weights = m.num_layers * m.hidden_size * (2 * m.hidden_size + 2 * kv
                                                    + 3 * m.intermediate_size)
    gathered_fp8 = sum(np.prod(shape) for shape in fp8.get("all-gather f8e4m3fn", []))
    assert gathered_fp8 >= block_weights, fp8
    tables = fp8["all-gather bf16"]
    assert tables and all(m.vocab_size in shape for shape in tables), fp8


def test_two_gpu_nodes_reduce_gradients_over_the_network(cuda_plugin):
    """Two nodes of four, the data axis across them: the gradient reduction crosses the
    network (DCN bytes), the fsdp gathers stay in the node (ICI bytes)."""
    nodes = _bench(cuda_plugin, "configs/tiny.yaml", "2xh100:4", "mesh.dcn_data=2",
                   "mesh.fsdp=4")
    assert nodes["device"].startswith("8 x NVIDIA H100")
    assert nodes["ici_bytes_per_device"] > 0 and nodes["dcn_bytes_per_device"] > 0


# slow (make test-all): a sweep's two layouts, each compiled in its own process; `make test`
# keeps the same compile-only path through the two bench tests above and the TPU plan test.
@pytest.mark.slow
def test_sweep_over_eight_gpus(cuda_plugin, tmp_path):
    """Layouts of one node of eight, each compiled in its own process (docs/sweeping.md's
    command)."""
    out = tmp_path / "sweep"
    result = run_cli("sweep", "configs/tiny.yaml", "--topology", "h100:8", "--out", str(out),
                     "--layouts", "fsdp=8;data=2,fsdp=4", env={ENV_CUDA_PLUGIN: str(cuda_plugin)})
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["topology"] == "h100:8" and summary["compile_only"]
    assert [row["layout"] for row in summary["rows"]] == ["fsdp=8", "data=2,fsdp=4"]
    for row in summary["rows"]:
        assert row["status"] == "ok" and row["fits"] is True, row
        assert row["device_memory_gib"] == pytest.approx(80e9 / 2**30)


SLICED_HEAD = """
import sys
from llama_jax.topology import prepare_compile_only, topology_devices
target = prepare_compile_only("h200")
import jax, numpy as np
from llama_jax.config import load_config
from llama_jax.sharding import make_mesh
from llama_jax.step import make_setup, make_train_step
cfg = load_config("configs/llama3.2-1b.yaml", sys.argv[1:])
setup = make_setup(cfg, make_mesh(cfg, topology_devices(target)))
b, t = cfg.train.global_batch_size, cfg.data.seq_len
batch = {k: jax.ShapeDtypeStruct((b, t), np.float32 if k == "weights" else np.int32, sharding=s)
         for k, s in setup.batch_shardings().items()}
print(make_train_step(setup).lower(setup.abstract_state, batch).compile().as_text())
"""


def _is_gemm(ins) -> bool:
    return (ins.op == "custom-call" and "matmul" in ins.attributes) or (
        ins.op == "fusion" and '"kind":"__triton' in ins.attributes)


def test_sliced_head_on_a_gpu_reads_its_logits_once_and_accumulates_in_the_gemm(cuda_plugin):
    """The 1B's sliced LM head (two layers: the head is what is checked) as XLA:GPU compiles
    it for an H200. In the loop over slices, the [D, V] float32 weight-gradient sum is only
    ever written by GEMMs (the sum is their accumulation, not a pass of its own), and each
    slice's float32 logits are read by one reduction (the paired max and sum), not two. Its
    cuDNN attention calls are costed by their matmul FLOPs."""
    result = subprocess.run(
        [sys.executable, "-c", SLICED_HEAD, *ONE_B, "model.num_layers=2",
         "train.global_batch_size=8", "model.loss_chunks=16"], capture_output=True, text=True,
        timeout=600, cwd=ROOT, env={**os.environ,
                                    ENV_CUDA_PLUGIN: str(cuda_plugin)})
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    computations, _ = parse_module(text)
    body = next(computations[name] for name in set(re.findall(r"\bbody=%?([\w.\-]+)", text))
                if any("128256]" in ins.shape for ins in computations[name]))
    weight_sums = [ins for ins in body if ins.op in ("fusion", "custom-call")
                   and re.match(r"\(?f32\[2048,128256\]", ins.shape)]
    assert weight_sums and all(_is_gemm(ins) for ins in weight_sums), \
        [ins.name for ins in weight_sums]
    logits = [ins for ins in body if _is_gemm(ins) and re.match(r"\(?f32\[1024,128256\]",
                                                                   ins.shape)]
    assert len(logits) == 1
    reductions = [ins for ins in body if logits[0].name in ins.operands
                  and "kind=kInput" in ins.attributes]
    assert len(reductions) == 1, [ins.name for ins in reductions]
    # The same program's cuDNN attention is priced by its FLOPs (hlo_cost): per layer two
    # causal products forward, five backward, of 2 B N H per visible query-key pair.
    attention = {}
    for item in program_items(text, 1):
        target = re.search(r'custom_call_target="(__cudnn\$fmha\w*)"', item.instruction.attributes)
        if target:
            attention[target.group(1)] = attention.get(target.group(1), 0.0) + (
                item.cost.flops * item.times)
    product = 2.0 * 8 * 32 * (2048 * 2049 // 2) * 64
    assert attention == {"__cudnn$fmhaSoftmax": 2 * 2 * product,
                         "__cudnn$fmhaSoftmaxBackward": 2 * 5 * product}
