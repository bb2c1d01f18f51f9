"""`llama-jax plan` and what it stands on: the compiled program's cost (hlo_cost.py), the
arithmetic that prunes, the chip table; plans on simulated CPU devices and for a TPU slice."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import CONFIGS
from helpers import ctrl_c_after, run_cli
from test_sweep import libtpu_path  # noqa: F401 - a fixture

from llama_jax import flops, hlo_cost
from llama_jax.bench import compiled_random_step
from llama_jax.chips import chip_of_kind
from llama_jax.config import load_config
from llama_jax.plan import INTERRUPTED, Candidate, candidates, estimated_bytes
from llama_jax.roofline import Roofline, chip_roofline
from llama_jax.step import make_setup
from llama_jax.topology import ENV_LIBTPU, parse_topology


def _compiled(*overrides):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.global_batch_size=16", "mesh.fsdp=4",
                                              "mesh.tensor=2", *overrides])
    _, _, compiled, _ = compiled_random_step(make_setup(cfg))
    return cfg, compiled


def test_program_cost_counts_loops_as_often_as_they_run():
    """The layers as a scan (a while loop) and unrolled are the same work: XLA's own count
    sees one trip of the loop, ours all of them, within 3% of each other and of the model's
    FLOPs (which count causal attention as half; XLA computes whole blocks)."""
    cfg, scanned = _compiled("model.scan_layers=true")
    _, unrolled = _compiled("model.scan_layers=false")
    loop = hlo_cost.program_cost(scanned.as_text(), 8)
    flat = hlo_cost.program_cost(unrolled.as_text(), 8)
    model = flops.flops_per_token(cfg.model, cfg.data.seq_len) * 16 * cfg.data.seq_len / 8
    assert loop.flops == pytest.approx(flat.flops, rel=0.03)
    assert model <= loop.flops <= 1.15 * model
    xla = scanned.cost_analysis()
    xla = xla[0] if isinstance(xla, list | tuple) else xla
    assert xla["flops"] < 0.6 * loop.flops  # why the module exists
    assert loop.ici_bytes == pytest.approx(flat.ici_bytes, rel=0.05) and loop.ici_bytes > 0
    assert set(loop.collectives) == set(flat.collectives)
    assert loop.dcn_bytes == 0


@pytest.mark.parametrize(("attributes", "groups"), [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, x",
     [[0, 2], [1, 3]]),
    ("channel_id=3, use_global_device_ids=true", [[0, 1, 2, 3]]),
])
def test_replica_group_notations(attributes, groups):
    assert sorted(map(sorted, hlo_cost.replica_groups(attributes, 4))) == groups


def test_collective_bytes_and_slices():
    text = """HloModule m

ENTRY %main (p: f32[8,4]) -> f32[32,8] {
  %p = f32[8,4]{1,0} parameter(0)
  %ag = f32[32,4]{1,0} all-gather(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = f32[8,4]{1,0} all-reduce(%p), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  ROOT %d = f32[32,8]{1,0} dot(%ag, %ar), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""
    cost = hlo_cost.program_cost(text, 8, slice_of=[0, 0, 0, 0, 1, 1, 1, 1])
    assert cost.collectives["all-gather"] == pytest.approx(0.75 * 32 * 4 * 4)
    assert cost.collectives["all-reduce"] == pytest.approx(2 * 0.5 * 8 * 4 * 4)
    assert cost.ici_bytes == cost.collectives["all-gather"]  # within a slice
    assert cost.dcn_bytes == cost.collectives["all-reduce"]  # across the two slices
    assert cost.flops == 2 * 32 * 8 * 4


def _xla_cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list | tuple) else cost


@pytest.mark.parametrize("case", ["batched matmul as a dilated convolution", "padded",
                                  "strided and dilated 2-D", "grouped"])
def test_convolution_flops_are_xlas(case):
    """XLA's own count is exact where there is no loop: the reference. The TPU compiler writes
    batched matmuls as the first kind; output x kernel size counts those 4 times over."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    conv, lhs, rhs = {
        "batched matmul as a dilated convolution": (
            lambda a, b: lax.conv_general_dilated(a, b, (3, 1), [(0, 0), (0, 0)],
                                                  lhs_dilation=(4, 1),
                                                  dimension_numbers=("HWNC", "HWIO", "HWNC")),
            (4, 2, 64, 32), (4, 1, 32, 64)),
        "padded": (lambda a, b: lax.conv_general_dilated(
            a, b, (1, 1), [(0, 0), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")),
            (4, 64, 2, 32), (1, 2, 32, 32)),
        "strided and dilated 2-D": (lambda a, b: lax.conv_general_dilated(
            a, b, (2, 2), [(1, 2), (0, 1)], rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC")), (2, 17, 13, 8), (3, 3, 8, 16)),
        "grouped": (lambda a, b: lax.conv_general_dilated(
            a, b, (1,), [(2, 2)], feature_group_count=4, dimension_numbers=("NWC", "WIO", "NWC")),
            (2, 33, 16), (5, 4, 32)),
    }[case]
    compiled = jax.jit(conv).lower(jnp.ones(lhs), jnp.ones(rhs)).compile()
    assert "convolution(" in compiled.as_text()
    assert hlo_cost.program_cost(compiled.as_text(), 1).flops == _xla_cost(compiled)["flops"]


def test_slices_and_updates_in_place_are_charged_their_part():
    """A fusion that reads one layer of a stack, and an update in place of one layer: the
    bytes are XLA's own (exact without loops), a slice's, not the stack's. A scan over the
    stack costs what the same loop unrolled does, where XLA's count sees one trip."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    stack, x, i = jnp.ones((16, 256, 256)), jnp.ones((256, 256)), jnp.int32(3)
    read = jax.jit(lambda s, i, x: jnp.tanh(lax.dynamic_index_in_dim(s, i, keepdims=False) * x))
    write = jax.jit(lambda s, i, x: lax.dynamic_update_index_in_dim(s, jnp.tanh(x), i, 0),
                    donate_argnums=0)
    for step in (read, write):
        compiled = step.lower(stack, i, x).compile()
        ours = hlo_cost.program_cost(compiled.as_text(), 1).bytes
        assert ours == _xla_cost(compiled)["bytes accessed"] < stack.nbytes

    def layers(s, x, unroll):
        return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, s, unroll=unroll)[0]

    looped, unrolled = (jax.jit(layers, static_argnums=2).lower(stack, x, n).compile()
                        for n in (1, 16))
    assert hlo_cost.program_cost(looped.as_text(), 1).bytes == pytest.approx(
        _xla_cost(unrolled)["bytes accessed"], rel=0.05)
    assert _xla_cost(looped)["bytes accessed"] < 0.2 * _xla_cost(unrolled)["bytes accessed"]


def test_a_gather_through_element_wise_ops_reads_what_it_gathers():
    """A fused gather of a converted, scaled operand (the loss taking each token's target logit
    from bf16 logits) reads the gathered elements: a fused loop computes each output element
    from the same elements of its element-wise producers' operands. XLA's own count charges
    the whole operand. An element-wise fusion's output is computed whole, so it reads its
    operands whole: there both counts agree."""
    import jax
    import jax.numpy as jnp

    x, i = jnp.ones((64, 4096), jnp.bfloat16), jnp.zeros((64, 1), jnp.int32)
    gather = jax.jit(lambda x, i: jnp.take_along_axis(x.astype(jnp.float32) * 2.0, i, axis=-1)
                     + 1.0).lower(x, i).compile()
    assert "gather(" in gather.as_text()
    read = 64 * x.dtype.itemsize + i.nbytes  # the gathered elements and the indices
    assert hlo_cost.program_cost(gather.as_text(), 1).bytes == read + 64 * 4
    assert _xla_cost(gather)["bytes accessed"] > x.nbytes
    whole = jax.jit(lambda x: x.astype(jnp.float32) * 2.0).lower(x).compile()
    assert hlo_cost.program_cost(whole.as_text(), 1).bytes == _xla_cost(whole)[
        "bytes accessed"] == x.nbytes * 3


@pytest.mark.parametrize(("mask", "window"), [("NO_MASK", 0), ("CAUSAL", 0), ("CAUSAL", 3),
                                              ("PADDING_CAUSAL", 32)])
@pytest.mark.parametrize("target", ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"])
def test_cudnn_attention_is_priced_by_its_flops(mask, window, target):
    """A cuDNN attention call (its backend config as XLA:GPU prints it) costs 2 H FLOPs per
    query-key pair its mask leaves, per product: 2 forward, 5 backward. The pairs are counted
    here from the mask itself, query by query."""
    b, n, t, s, h = 2, 4, 8, 8, 16
    config = ('{"cudnn_fmha_backend_config": {"fmha_scale": 0.25, "intermediate_tensor_shape": '
              f'{{"element_type": "BF16", "dimensions": ["{b}", "{n}", "{t}", "{s}"], '
              '"tuple_shapes": [], "layout": {"minor_to_major": ["3", "2", "1", "0"]}}, '
              f'"mask_type": "{mask}", "sliding_window_length": {window}}}}}')
    text = (f"HloModule m\n\nENTRY %main (q: bf16[{b},{t},{n},{h}]) -> bf16[{b},{n},{t},{h}] {{\n"
            f"  %q = bf16[{b},{t},{n},{h}]{{3,2,1,0}} parameter(0)\n"
            f"  ROOT %a = bf16[{b},{n},{t},{h}]{{3,2,1,0}} custom-call(%q, %q, %q), "
            f'custom_call_target="{target}", backend_config={config}\n}}\n')
    causal = np.tril(np.ones((t, s), bool))
    visible = causal if "CAUSAL" in mask else np.ones((t, s), bool)
    if window:
        visible &= np.triu(np.ones((t, s), bool), -(window - 1))  # the last `window` keys
    products = 5 if "Backward" in target else 2
    assert hlo_cost.program_cost(text, 1).flops == 2 * b * n * h * visible.sum() * products


def test_nested_fusions_index_comments_and_on_chip_memory():
    """What the TPU compiler writes: a fusion slicing its operand inside a nested fusion, a
    `/*index=5*/` comment before every fifth operand, arrays in on-chip memory (`S(1)`)."""
    text = """HloModule m

%inner (q.0: f32[64,128], i.0: s32[]) -> f32[8,128] {
  %q.0 = f32[64,128]{1,0} parameter(0)
  %i.0 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[8,128]{1,0} dynamic-slice(%q.0, %i.0, %z), dynamic_slice_sizes={8,128}
}

%outer (p.0: f32[4], p.5: f32[64,128]) -> f32[8,128] {
  %p.0 = f32[4]{0} parameter(0)
  %p.1 = f32[4]{0} parameter(1)
  %p.2 = f32[4]{0} parameter(2)
  %p.3 = f32[4]{0} parameter(3)
  %p.4 = f32[4]{0} parameter(4)
  %p.5 = f32[64,128]{1,0} parameter(5)
  %p.6 = s32[] parameter(6)
  %p.7 = f32[8,128]{1,0:S(1)} parameter(7)
  %f = f32[8,128]{1,0} fusion(%p.5, %p.6), kind=kLoop, calls=%inner
  ROOT %m = f32[8,128]{1,0} multiply(%f, %p.7)
}

ENTRY %main (a: f32[64,128], b: s32[], c: f32[8,128], d: f32[4]) -> f32[8,128] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = s32[] parameter(1)
  %c = f32[8,128]{1,0:S(1)} parameter(2)
  %d = f32[4]{0} parameter(3)
  ROOT %r = f32[8,128]{1,0} fusion(%d, %d, %d, %d, %d, /*index=5*/%a, %b, %c), calls=%outer
}
"""
    slice_bytes = 8 * 128 * 4
    assert hlo_cost.program_cost(text, 1).bytes == 3 * slice_bytes + 4  # the slice, c, result
    assert hlo_cost.program_cost(text, 1, on_chip_space=1).bytes == 2 * slice_bytes + 4


def test_roofline_is_per_kernel_at_each_size_rate():
    """Kernels binned by the size classes of their FLOPs and bytes: each bin bound by the
    slower of its matmuls at peak and its memory traffic at the rate measured nearest its size
    (log scale), the bins summed; collectives add their bytes and their latency; the model's
    FLOPs at peak are the floor. Figures as `bench` prints them (JSON)."""
    limits = Roofline(peak_flops=100.0, memory_bytes_per_s=10.0, ici_bytes_per_s=5.0,
                      dcn_bytes_per_s=1.0, source="test",
                      memory_rates=((1024, 40.0), (2**20, 10.0)), collective_latency_s=0.5)
    figures = {"hlo_kernels": {"64:4096": [200.0, 40.0, 3],  # 200/100 = 2 s > 40/40 = 1 s
                               "1024:262144": [200.0, 30.0, 1],  # 2 s < 30/10 = 3 s
                               "1:4096": [0.0, 80.0, 5]},  # no matmul: 80/40 = 2 s
               "ici_bytes_per_device": 10.0, "dcn_bytes_per_device": 1.0,
               "collective_ops": 2, "model_flops_per_device": 0.0}
    figures = json.loads(json.dumps(figures))
    assert limits.kernel_seconds(figures["hlo_kernels"]) == 2 + 3 + 2
    assert limits.step_seconds(figures) == 7 + 10 / 5 + 1 / 1 + 2 * 0.5
    assert limits.step_seconds({**figures, "model_flops_per_device": 1000.0}) == 10 + 4.0
    chip = chip_roofline("TPU v5")  # one rate at every size
    assert chip.kernel_seconds({"16:1": [459e12, 0, 1], "4:4": [459e12, 0, 1]}) == 2.0
    assert Roofline.from_json(json.loads(json.dumps(limits.to_json()))) == limits
    slower = Roofline(50.0, 10.0, 6.0, 1.0, "test", ((1024, 30.0), (2**20, 12.0)), 0.25)
    best = limits.best_of(slower)  # figure by figure, the faster
    assert (best.peak_flops, best.ici_bytes_per_s, best.collective_latency_s) == (100, 6, 0.25)
    assert best.memory_rates == ((1024, 40.0), (2**20, 12.0)) and best.measured
    assert not chip.measured
    assert [hlo_cost.size_class(x) for x in (0, 1, 3, 10, 2**20, 3 * 2**20)] == [
        1, 1, 4, 16, 2**20, 4 * 2**20]


def test_kernels_are_fusions_with_their_matmuls():
    text = """HloModule m

%fused (a.0: f32[8,4], b.0: f32[4,16]) -> f32[8,16] {
  %a.0 = f32[8,4]{1,0} parameter(0)
  %b.0 = f32[4,16]{1,0} parameter(1)
  %d = f32[8,16]{1,0} dot(%a.0, %b.0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = f32[8,16]{1,0} tanh(%d)
}

ENTRY %main (a: f32[8,4], b: f32[4,16]) -> f32[8,16] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,16]{1,0} parameter(1)
  %f = f32[8,16]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
  ROOT %n = f32[8,16]{1,0} negate(%f)
}
"""
    cost = hlo_cost.program_cost(text, 1)
    matmul, moved = 2 * 8 * 16 * 4, 4 * (8 * 4 + 4 * 16 + 8 * 16)
    key = f"{hlo_cost.size_class(matmul)}:{hlo_cost.size_class(moved)}"
    assert cost.kernels == {key: [matmul, moved, 1.0, 0.0],
                            "1:1024": [0.0, 2 * 4 * 8 * 16, 1.0, 0.0]}


def test_fp8_matmuls_are_priced_at_the_fp8_peak():
    """A GEMM with fp8 operands (cuBLASLt's fp8 call, or a dot fused with its scaling) runs at
    the chip's fp8 peak, twice the bf16 one on an H100/H200; a dot whose fp8 operands XLA
    upcast first is a bf16 one. In their own bins, so one bin's max(compute, memory) never
    mixes the two rates."""
    text = """HloModule m

%scaled (a.0: f8e4m3fn[512,1024], b.0: f8e4m3fn[1024,2048], s.0: f32[]) -> bf16[512,2048] {
  %a.0 = f8e4m3fn[512,1024]{1,0} parameter(0)
  %b.0 = f8e4m3fn[1024,2048]{1,0} parameter(1)
  %s.0 = f32[] parameter(2)
  %d = f32[512,2048]{1,0} dot(%a.0, %b.0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %s.1 = f32[512,2048]{1,0} broadcast(%s.0), dimensions={}
  %m = f32[512,2048]{1,0} multiply(%d, %s.1)
  ROOT %c = bf16[512,2048]{1,0} convert(%m)
}

%upcast (a.1: f8e4m3fn[512,1024], b.1: bf16[1024,2048]) -> bf16[512,2048] {
  %a.1 = f8e4m3fn[512,1024]{1,0} parameter(0)
  %b.1 = bf16[1024,2048]{1,0} parameter(1)
  %u = bf16[512,1024]{1,0} convert(%a.1)
  ROOT %e = bf16[512,2048]{1,0} dot(%u, %b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f8e4m3fn[512,1024], b: f8e4m3fn[1024,2048], s: f32[], w: bf16[]) -> bf16[] {
  %a = f8e4m3fn[512,1024]{1,0} parameter(0)
  %b = f8e4m3fn[1024,2048]{1,0} parameter(1)
  %s = f32[] parameter(2)
  %w = bf16[1024,2048]{1,0} parameter(3)
  %g = bf16[512,2048]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul$f8", \
backend_config={"gemm_backend_config":{"dot_dimension_numbers":{\
"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %f = bf16[512,2048]{1,0} fusion(%a, %b, %s), kind=kCustom, calls=%scaled
  %x = bf16[512,2048]{1,0} fusion(%a, %w), kind=kCustom, calls=%upcast
  %y = bf16[512,2048]{1,0} add(%g, %f)
  ROOT %z = bf16[512,2048]{1,0} add(%y, %x)
}
"""
    assert hlo_cost.fp8_matmuls(text) == 2  # the call and the scaled dot, not the upcast one
    cost = hlo_cost.program_cost(text, 1)
    product = 2.0 * 512 * 2048 * 1024
    assert (cost.flops, cost.fp8_flops) == (3 * product, 2 * product)
    fp8_bins = {k: v for k, v in cost.kernels.items() if k.endswith(":f8")}
    assert sum(v[0] for v in fp8_bins.values()) == sum(v[3] for v in fp8_bins.values()) \
        == 2 * product
    assert all(v[3] == 0 for k, v in cost.kernels.items() if not k.endswith(":f8"))
    h200 = chip_roofline("NVIDIA H200")
    assert h200.fp8_peak_flops == pytest.approx(2 * h200.peak_flops, rel=1e-3)  # datasheet
    no_memory = {k: [v[0], 0.0, *v[2:]] for k, v in cost.kernels.items()}
    expected = product / h200.peak_flops + 2 * product / h200.fp8_peak_flops
    assert h200.kernel_seconds(no_memory) == pytest.approx(expected)
    a100 = chip_roofline("NVIDIA A100-SXM4-80GB")  # no fp8 units: all at the bf16 peak
    assert a100.kernel_seconds(no_memory) == pytest.approx(3 * product / a100.peak_flops)
    # the model's FLOPs as the floor: at the same fp8 share as the program's
    figures = {"hlo_kernels": {}, "model_flops_per_device": 3 * product,
               "hlo_flops_per_device": cost.flops, "hlo_fp8_flops_per_device": cost.fp8_flops}
    assert h200.step_seconds(figures) == pytest.approx(expected)


def test_chip_table_matches_device_kinds():
    assert chip_of_kind("TPU v5 lite").name == "v5e"
    assert chip_of_kind("TPU v5").name == "v5p"
    assert chip_of_kind("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert chip_of_kind("cpu") is None
    assert parse_topology("v5p:2x2x2").hbm_bytes == pytest.approx(95.74 * 2**30)


def test_arithmetic_prunes_what_cannot_fit_an_8b_model():
    """Llama 3 8B, seq 8192, 16 rows on a v5p:2x2x2 (95.7 GiB per chip): without remat two
    rows' activations per chip are well over; full remat over fsdp=8 is well inside."""
    cfg = load_config(CONFIGS / "llama3-8b.yaml", ["model.compute_dtype=bfloat16"])
    state = flops.state_bytes(cfg)["total"]
    hbm = parse_topology("v5p:2x2x2").hbm_bytes
    found = candidates(cfg, 8, 8 * 8192, [8192], ["none", "full"])
    assert {c.remat for c in found} == {"none", "full"} and {c.loss_chunks for c in found} == {0, 1}
    assert any(c.layout["sequence"] > 1 for c in found)  # long context: the sequence axis

    def one(remat, **layout):
        full = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **layout}
        return Candidate(8192, full, 16, 1, remat, 0)

    assert estimated_bytes(cfg, one("none", fsdp=8), state) > hbm
    assert estimated_bytes(cfg, one("full", fsdp=8), state) < 0.5 * hbm
    assert estimated_bytes(cfg, one("full", data=8), state) > hbm  # unsharded state: 8B x 16 B


def test_a_plan_interrupted_by_ctrl_c_keeps_what_it_compiled(tmp_path):
    """Ctrl-C after the first compile: no further candidate is compiled (it compiled all of
    them, then wrote nothing), those compiled are ranked and written, the rest are skipped
    as interrupted, and the exit status is 130."""
    out = tmp_path / "plan"
    code, _, stderr = ctrl_c_after(
        "compiled ", "plan", "configs/tiny.yaml", "--devices", "8", "--remat", "full",
        "--tokens-per-step", "1024", "--measure", "0", "--out", str(out))
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("llama-jax plan: interrupted;")
    rows = json.loads((out / "plan.json").read_text())["rows"]
    # The one seen, and at most one more per job (2) that finished before the signal landed:
    # with compiles from the cache, the job that printed can start and end another meanwhile.
    assert 1 <= sum(r["status"] == "ok" for r in rows) <= 3
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) > 5 and {r["reason"] for r in skipped} == {INTERRUPTED}
    assert (out / "plan.yaml").is_file()


def test_plan_on_simulated_cpu_devices(tmp_path):
    """Prune, compile (two at a time), predict, measure the best two, write the four files;
    the best as plan.yaml trains as it is."""
    out = tmp_path / "plan"
    done = run_cli("plan", "configs/tiny.yaml", "--devices", "8", "--remat", "full",
                   "--tokens-per-step", "1024", "--budget-minutes", "0.5", "--measure", "2",
                   "--steps", "2", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "plan.json").read_text())
    rows = result["rows"]
    ranked = [r for r in rows if r["rank"]]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) >= 2
    assert ranked[0]["measured_step_s"] and ranked[1]["measured_step_s"]  # measured first
    assert ranked[0]["measured_step_s"] <= ranked[1]["measured_step_s"]
    assert all(r["predicted_step_s"] > 0 and r["compiled_gib"] > 0 for r in ranked)
    limits = result["roofline"]  # measured with the 8 simulated devices running at once
    assert len(limits["memory_rates"]) == 3 and "best of two" in limits["source"]
    assert limits["collective_latency_s"] > 0 and "8 CPU devices at once" in limits["source"]
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(r["reason"] for r in pruned)  # tensor=8 cannot split 2 KV heads
    assert all(r["status"] in ("ok", "pruned", "skipped") for r in rows)
    with (out / "plan.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "plan.png").stat().st_size > 10_000
    best = load_config(out / "plan.yaml")
    assert f"train.microbatches={best.train.microbatches}" in ranked[0]["overrides"]
    assert best.train.global_batch_size * best.data.seq_len == 1024
    trained = run_cli("train", str(out / "plan.yaml"), f"run_dir={tmp_path / 'run'}",
                      "train.steps=2", "train.eval_every=0", timeout=600)
    assert trained.returncode == 0, trained.stderr


def test_plan_refusals_are_one_line(tmp_path):
    missing = run_cli("plan", "configs/tiny.yaml")
    assert missing.returncode == 2 and "--topology" in missing.stderr
    odd = run_cli("plan", "configs/tiny.yaml", "--devices", "8", "--tokens-per-step", "1000",
                  "--out", str(tmp_path / "p"))
    assert odd.returncode == 2
    assert odd.stderr.strip().splitlines() == [
        "llama-jax plan: error: --tokens-per-step 1000 is not a multiple of the sequence "
        "length 64"]
    assert not (tmp_path / "p").exists()
    (tmp_path / "file").write_text("")
    under_a_file = run_cli("plan", "configs/tiny.yaml", "--devices", "8",
                           "--out", str(tmp_path / "file" / "p"), timeout=120)
    assert under_a_file.returncode == 2
    assert under_a_file.stderr.strip().splitlines() == [
        f"llama-jax plan: error: --out {tmp_path / 'file' / 'p'}: {tmp_path / 'file'} is not "
        "a directory"]  # said before compiling anything


def test_plan_for_a_tpu_slice_gives_a_config_that_fits(tmp_path, libtpu_path):  # noqa: F811
    out = tmp_path / "plan"
    env = {ENV_LIBTPU: str(libtpu_path)}
    done = run_cli("plan", "configs/tiny.yaml", "--topology", "v5p:2x2x2", "--remat", "full",
                   "--budget-minutes", "0.5", "--out", str(out), env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "plan.json").read_text())
    assert result["roofline"]["peak_flops"] == 459e12 and not result["measured"]
    best = result["rows"][0]
    assert best["rank"] == 1 and best["device_memory_gib"] == pytest.approx(95.74)
    bench = run_cli("bench", str(out / "plan.yaml"), "--topology", "v5p:2x2x2", env=env,
                    timeout=900)
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    assert figures["fits"] is True
    assert figures["predicted_step_s"] == pytest.approx(best["predicted_step_s"], rel=1e-6)
    # The TPU compiler's convolutions counted for the work they do: near the model's FLOPs
    # (which count causal attention as half, and full remat as 4/3 of the step), not several
    # times over.
    model = figures["model_flops_per_device"]
    assert 0.85 * model <= figures["hlo_flops_per_device"] <= 1.3 * model
