"""The GPU fast paths, checked on CPU: the fused LM-head loss, fp8 matmuls, and the remat
policy that keeps a fused attention kernel's forward outputs."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers import tiny

from llama_jax import loss as loss_mod
from llama_jax.bench import compile_only
from llama_jax.config import load_config
from llama_jax.errors import ConfigError
from llama_jax.fp8 import fp8_matmul
from llama_jax.loss import auto_chunks, chunked_head_loss_sums, head_loss_sums, loss_sums
from llama_jax.model import Transformer
from llama_jax.ops import HeadProduct, head_matmul
from llama_jax.step import gradients, make_setup

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls
# fp8 gradients whose logits gradients were quantised by other amaxes (slices of the LM head):
# E4M3 rounding apart, 2^-4 relative per element at most.
TOL_FP8 = 0.08


@pytest.mark.parametrize("chunks", [0, 3, 4], ids=["fused", "3-slices", "4-slices"])
@pytest.mark.parametrize(("dtype", "head"), [("float32", "compute"), ("bfloat16", "compute"),
                                             ("bfloat16", "bf16-logits"), ("bfloat16", "fp8")])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_head_loss_matches_autodiff(dtype, head, z_loss, chunks):
    """Loss and both gradients equal autodiff of logits -> cross-entropy, with padding
    weights and z-loss, for the fused head and its chunked form (model.loss_chunks); a wrong
    sign or scale of any term fails it. Both outputs carry a cotangent (the total and the
    cross-entropy enter the differentiated value with other weights). With an fp8 head the
    loss is the same whatever the slices (one scale for the input); the slices' logits
    gradients have their own scales, so their gradients differ by fp8 rounding. With bf16
    logits (model.logits_dtype) autodiff takes the same rounded logits."""
    product = HeadProduct(fp8=head == "fp8",
                          logits_dtype="bfloat16" if head == "bf16-logits" else "float32")
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 12, 32)).astype(dtype)
    w = jax.random.normal(k[1], (32, 70)).astype(dtype)
    targets = jax.random.randint(k[2], (2, 12), 0, 70)
    weights = (jax.random.uniform(k[3], (2, 12)) > 0.3).astype(jnp.float32)

    def value(sums):
        total, aux = sums
        return total + 0.5 * aux["ce_sum"], aux

    def reference(x, w):
        return value(loss_sums(head_matmul(x, w, product), targets, weights, z_loss))

    def fused(x, w):
        if chunks:
            return value(chunked_head_loss_sums(x, w, targets, weights, z_loss, chunks,
                                                product))
        return value(head_loss_sums(x, w, targets, weights, z_loss, product))

    (ref_total, ref_aux), ref_grads = jax.value_and_grad(reference, (0, 1), has_aux=True)(x, w)
    (total, aux), grads = jax.value_and_grad(fused, (0, 1), has_aux=True)(x, w)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    np.testing.assert_allclose(aux["ce_sum"], ref_aux["ce_sum"], rtol=1e-6)
    assert aux["tokens"] == weights.sum()
    tol = {"float32": 1e-6, "bfloat16": 1e-2}[dtype] if head != "fp8" or not chunks else TOL_FP8
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=tol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))


@pytest.mark.parametrize("head", ["compute", "fp8"])
def test_sliced_head_sums_its_weight_gradient_as_the_gemm_accumulates(head):
    """Each slice's LM-head weight gradient is a float32 product added to the float32 running
    sum, never a bf16 product converted: on a GPU the add then becomes the GEMM's own
    accumulation (cuBLAS beta = 1 or the Triton GEMM's epilogue), where a bf16 product made
    one more pass over the [D, V] float32 sum per slice (9.7 ms of the 1B step on an H200:
    docs/performance.md). XLA:CPU folds the convert into the dot either way, so the program
    as JAX writes it is what is checked."""
    product = HeadProduct(fp8=head == "fp8")
    x, w = jnp.zeros((2, 12, 32), jnp.bfloat16), jnp.zeros((32, 70), jnp.bfloat16)
    targets, weights = jnp.zeros((2, 12), jnp.int32), jnp.ones((2, 12), jnp.float32)
    text = jax.jit(jax.grad(lambda w: chunked_head_loss_sums(
        x, w, targets, weights, 0.0, 4, product)[0])).lower(w).as_text()
    weight_products = re.findall(r"stablehlo\.dot_general .*-> tensor<32x70x(\w+)>", text)
    assert weight_products and set(weight_products) == {"f32"}, weight_products


@pytest.mark.parametrize("chunks", [0, 4], ids=["fused", "4-slices"])
def test_bf16_logits_are_the_heads_output_and_the_loss_stays_float32(chunks):
    """model.logits_dtype=bfloat16: the head's product writes bf16 logits (half the bytes the
    loss then reads) and no float32 [.., V] tensor is formed outside the loss's fused
    reductions; the loss and gradients stay float32 sums, within bf16 rounding of the logits
    (2^-9 relative each) of the float32-logits loss: the cross-entropy within 1e-2 per token
    here (logits of scale ~5), the gradients within 2% of their largest element."""
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (2, 12, 32)).astype(jnp.bfloat16)
    w = (0.2 * jax.random.normal(k[1], (32, 70))).astype(jnp.bfloat16)
    targets = jax.random.randint(k[2], (2, 12), 0, 70)
    weights = jnp.ones((2, 12), jnp.float32)

    def total(x, w, logits_dtype):
        product = HeadProduct(logits_dtype=logits_dtype)
        if chunks:
            return chunked_head_loss_sums(x, w, targets, weights, 0.0, chunks, product)[0]
        return head_loss_sums(x, w, targets, weights, 0.0, product)[0]

    text = jax.jit(jax.grad(total, (0, 1)), static_argnums=2).lower(x, w, "bfloat16").as_text()
    # [B, T, V] products (the sliced weight gradient [D, V] is float32 on purpose)
    logits_products = re.findall(r"stablehlo\.dot_general [^\n]*-> tensor<\d+x\d+x70x(\w+)>",
                                 text)
    assert "bf16" in logits_products and "f32" not in logits_products, logits_products
    (f32_loss, f32_grads), (bf16_loss, bf16_grads) = (
        jax.value_and_grad(total, (0, 1))(x, w, dtype) for dtype in ("float32", "bfloat16"))
    assert bf16_loss.dtype == jnp.float32
    assert bf16_loss != f32_loss  # the rounding is there
    np.testing.assert_allclose(bf16_loss / 24, f32_loss / 24, atol=1e-2)
    for a, b in zip(bf16_grads, f32_grads, strict=True):
        b32 = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), b32,
                                   atol=0.02 * float(np.abs(b32).max()))


def test_one_pass_logsumexp_matches_two_pass_at_the_edges():
    """The paired (max, sum) reduction the GPU runs gives jax.nn.logsumexp's values, also for
    rows of -inf (an empty row: -inf, not NaN), +inf (inf) and NaN (NaN, so the run's
    non-finite check sees it), and `logsumexp`'s gradient is autodiff's."""
    x = 8.0 * jax.random.normal(jax.random.key(0), (3, 5, 70))
    x = (x.at[0, 0].set(-jnp.inf).at[0, 1, :3].set(jnp.inf).at[0, 2, 5].set(jnp.nan)
         .at[1, 0, 7].set(-jnp.inf).at[1, 1, 9].set(80.0))
    expected = jax.nn.logsumexp(x, axis=-1)
    for got in (loss_mod._logsumexp_one_pass(x), jax.jit(loss_mod._logsumexp_one_pass)(x),
                loss_mod.logsumexp(x)):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
        np.testing.assert_array_equal(np.asarray(got)[0, :3], [-np.inf, np.inf, np.nan])
        np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-6)
    finite = x[1:]
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(loss_mod.logsumexp(x) ** 2))(finite),
        jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(x, axis=-1) ** 2))(finite),
        rtol=1e-5, atol=1e-6)


def test_loss_reads_the_logits_once_on_a_gpu_twice_on_cpu():
    """Lowered for CUDA, the loss's log-sum-exp is one reduction of (max, sum) pairs over
    the logits; for the CPU, the two vectorised passes (max, then sum of exponentials)."""
    logits = jax.ShapeDtypeStruct((2, 12, 70), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, 12), jnp.int32)
    weights = jax.ShapeDtypeStruct((2, 12), jnp.float32)
    traced = jax.jit(lambda *a: loss_sums(*a, 0.0)[0]).trace(logits, targets, weights)

    def reductions_of_logits(platform):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        return re.findall(r"stablehlo\.reduce\((%[\w#]+) init: [^)]*\)(, \(%[\w#]+ init)?"
                          r"[^\n]*tensor<2x12x70xf32>", text)

    gpu, cpu = reductions_of_logits("cuda"), reductions_of_logits("cpu")
    assert len(gpu) == 1 and gpu[0][1], gpu  # one reduction, of two operands
    assert len(cpu) == 2 and not any(paired for _, paired in cpu), cpu


def _setup(extra=()):
    return make_setup(load_config("configs/tiny.yaml", ["model.compute_dtype=bfloat16", *extra]))


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, t = cfg.train.global_batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((b, t), np.float32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, t), np.int32)}


def test_train_step_gradients_same_with_fused_loss():
    """The whole model's gradients through the fused head equal those of the logits path."""
    fused, plain = _setup(), _setup(["train.fused_loss=false"])
    params = nnx.to_pure_dict(nnx.state(Transformer(fused.cfg.model, nnx.Rngs(0))))
    batch = _batch(fused.cfg)
    g_fused, aux_fused = jax.jit(lambda p: gradients(fused, p, batch))(params)
    g_plain, aux_plain = jax.jit(lambda p: gradients(plain, p, batch))(params)
    np.testing.assert_allclose(aux_fused["loss"], aux_plain["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2 * float(jnp.max(jnp.abs(b))) + 1e-8)


def _emulated_fp8_matmul(x, w, fmt_x, fmt_w):
    """Reference: scale each operand by amax / format max, round to the fp8 format with
    ml_dtypes (not jax), multiply in float64, scale back."""
    def q(a, fmt):
        a = np.asarray(a, np.float64)
        scale = np.abs(a).max() / float(ml_dtypes.finfo(fmt).max)
        return (a / scale).astype(np.float32).astype(fmt).astype(np.float64), scale
    qx, sx = q(x, fmt_x)
    qw, sw = q(w, fmt_w)
    return qx @ qw * sx * sw


@pytest.mark.parametrize("grad_format", ["e4m3", "e5m2"])
@pytest.mark.parametrize("weight_gradient", ["fp8", "bf16"])
def test_fp8_matmul_is_current_scaled_fp8(grad_format, weight_gradient):
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (3, 40, 64), jnp.float32).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(k[1], (64, 48))).astype(jnp.bfloat16)
    dy = jax.random.normal(k[2], (3, 40, 48)).astype(jnp.bfloat16)
    y, pullback = jax.vjp(fp8_matmul(grad_format, weight_gradient), x, w)
    dx, dw = pullback(dy)
    x2, dy2 = np.asarray(x, np.float32).reshape(-1, 64), np.asarray(dy, np.float32).reshape(-1, 48)
    e4m3 = ml_dtypes.float8_e4m3fn
    grad = {"e4m3": e4m3, "e5m2": ml_dtypes.float8_e5m2}[grad_format]
    expected = {
        "y": _emulated_fp8_matmul(x2, np.asarray(w, np.float32), e4m3, e4m3),
        "dx": _emulated_fp8_matmul(dy2, np.asarray(w, np.float32).T, grad, e4m3),
        "dw": _emulated_fp8_matmul(x2.T, dy2, e4m3, grad),
    }
    if weight_gradient == "bf16":  # fp8-rounded activations, the gradient as it is
        qx = _emulated_fp8_matmul(x2, np.eye(64, dtype=np.float32), e4m3, e4m3)
        expected["dw"] = qx.T @ dy2.astype(np.float64)
    got = {"y": y.reshape(-1, 48), "dx": dx.reshape(-1, 64), "dw": dw}
    for name, value in got.items():
        assert value.dtype == jnp.bfloat16, name
        ref = expected[name]
        # Only the bf16 output rounding separates the two (2^-8 relative).
        np.testing.assert_allclose(np.asarray(value, np.float64), ref,
                                   atol=2 ** -7 * np.abs(ref).max(), err_msg=name)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    rel = np.linalg.norm(np.asarray(y, np.float32) - exact) / np.linalg.norm(exact)
    assert 1e-3 < rel < 0.06  # really fp8 (not bf16), and as close as E4M3 allows


def test_fp8_matmul_in_float16_is_scaled_back_before_float16():
    """Under `model.compute_dtype=float16` the unscaled fp8 product (operands up to 448,
    summed over 256 here: up to 5e7) would overflow float16's 65504: every output and
    gradient was Inf/NaN and every step skipped. Product, input gradient and LM-head gradient
    are finite float16 and as close to the exact product as the bf16 ones are."""
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (4, 32, 256), jnp.float32).astype(jnp.float16)
    w = (0.05 * jax.random.normal(k[1], (256, 48))).astype(jnp.float16)
    dy = jax.random.normal(k[2], (4, 32, 48)).astype(jnp.float16)
    head = HeadProduct(fp8=True)
    for name, fn in (("block", fp8_matmul()), ("head", lambda a, b: head_matmul(a, b, head))):
        y, pullback = jax.vjp(fn, x, w)
        dx, _ = pullback(dy.astype(y.dtype))
        exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
        exact_dx = np.asarray(dy, np.float32) @ np.asarray(w, np.float32).T
        assert dx.dtype == jnp.float16, name
        for got, ref in ((y, exact), (dx, exact_dx)):
            got = np.asarray(got, np.float32)
            assert np.isfinite(got).all(), name
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.06, name


@pytest.mark.parametrize("weight_gradient", ["fp8", "bf16"])
def test_fp8_head_is_current_scaled_fp8_with_float32_logits(weight_gradient):
    """`model.fp8_head`: the LM head's logits are the fp8 product accumulated and returned
    in float32, its gradients fp8 products of the logits gradient (rounded to bf16 first, as
    the compute-dtype head does), against the ml_dtypes emulation."""
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], (2, 24, 64), jnp.float32).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(k[1], (64, 96))).astype(jnp.bfloat16)
    dy = jax.random.normal(k[2], (2, 24, 96), jnp.float32)
    product = HeadProduct(fp8=True, weight_gradient=weight_gradient)
    logits, pullback = jax.vjp(lambda x, w: head_matmul(x, w, product), x, w)
    dx, dw = pullback(dy)
    x2 = np.asarray(x, np.float32).reshape(-1, 64)
    dy2 = np.asarray(dy.astype(jnp.bfloat16), np.float32).reshape(-1, 96)
    e4m3, w2 = ml_dtypes.float8_e4m3fn, np.asarray(w, np.float32)
    expected_logits = _emulated_fp8_matmul(x2, w2, e4m3, e4m3)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits).reshape(-1, 96), expected_logits,
                               atol=1e-6 * np.abs(expected_logits).max())
    expected = {"dx": _emulated_fp8_matmul(dy2, w2.T, e4m3, e4m3),
                "dw": _emulated_fp8_matmul(x2.T, dy2, e4m3, e4m3)}
    if weight_gradient == "bf16":
        expected["dw"] = _emulated_fp8_matmul(x2, np.eye(64, dtype=np.float32), e4m3,
                                              e4m3).T @ dy2.astype(np.float64)
    for name, value in {"dx": dx.reshape(-1, 64), "dw": dw}.items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(value, np.float64), expected[name],
                                   atol=2 ** -7 * np.abs(expected[name]).max(), err_msg=name)
    exact = x2 @ w2
    rel = np.linalg.norm(np.asarray(logits).reshape(-1, 96) - exact) / np.linalg.norm(exact)
    assert 1e-3 < rel < 0.06  # really fp8, not the bf16 product


@pytest.mark.parametrize(("grad_format", "fp8_head"), [("e4m3", False), ("e5m2", True)])
def test_fp8_model_gradients_close_to_bf16_and_lowered_to_fp8_dots(grad_format, fp8_head):
    """Stated tolerance: every fp8 parameter gradient within 15% (relative L2) of bf16's;
    the step's matmuls of the block take fp8 operands, and the LM head's only with
    `model.fp8_head` (its forward and its two gradient products)."""
    bf16 = _setup()
    fp8 = _setup(["model.quantization=fp8", f"model.fp8_gradients={grad_format}",
                  f"model.fp8_head={str(fp8_head).lower()}"])
    params = nnx.to_pure_dict(nnx.state(Transformer(bf16.cfg.model, nnx.Rngs(0))))
    batch = _batch(bf16.cfg)
    g16, aux16 = jax.jit(lambda p: gradients(bf16, p, batch))(params)
    step8 = jax.jit(lambda p: gradients(fp8, p, batch))
    g8, aux8 = step8(params)
    assert abs(float(aux8["loss"]) - float(aux16["loss"])) < 0.01 * float(aux16["loss"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g16),
                            strict=True):
        rel = float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-12))
        assert rel < 0.15, (jax.tree_util.keystr(path), rel)
    hlo = step8.lower(params).as_text()
    fp8_dots = [line for line in hlo.splitlines()
                if "dot_general" in line and "f8E" in line.split("->")[0]]
    vocab = str(bf16.cfg.model.vocab_size)
    head_dots = [line for line in fp8_dots if vocab in line]
    # 7 projections x (forward + 2 gradient products), one set per scanned layer body.
    assert len(fp8_dots) - len(head_dots) >= 7 * 3, len(fp8_dots)
    assert len(head_dots) == (3 if fp8_head else 0), head_dots


def test_attention_policy_saves_the_fused_kernels_forward(monkeypatch):
    """With cuDNN attention, `projections_and_attention` keeps the kernel's output and
    log-sum-exp, so the backward has no second forward kernel (dots-only policies re-run
    it). Traced to a jaxpr with the cuDNN availability checks stubbed: CPU cannot run it."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_is_flash_attention", lambda *a, **k: None)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    base = load_config("configs/tiny.yaml", ["model.attention=cudnn", "model.head_dim=64",
                                             "model.compute_dtype=bfloat16"]).model

    def forward_kernels(policy: str) -> int:
        cfg = dataclasses.replace(base, remat=policy)
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
        tokens = jnp.zeros((2, 128), jnp.int32)

        def loss(s):
            return jnp.mean(nnx.merge(graphdef, s)(tokens))

        # The scanned layer body appears once in the jaxpr, however many layers there are.
        return str(jax.make_jaxpr(jax.grad(loss))(state)).count("dot_product_attention_fwd")

    assert forward_kernels("none") == 1
    assert forward_kernels("projections_and_attention") == 1
    assert forward_kernels("dots_with_no_batch_dims_saveable") == 2


def test_attention_policy_keeps_rotated_q_and_k_in_place_of_the_projections(monkeypatch):
    """`projections_and_attention` keeps attention's rotated Q and K for the backward, so it
    does not rotate them again (8.9 GB and 1.8 ms of the 1B step compiled for an H200), and
    keeps no more bytes than saving the projections' outputs did: the Q and K projections'
    own outputs are no residual any more (their backward needs only their input)."""
    import contextlib
    import io
    import sys

    from helpers import ROOT
    from jax.ad_checkpoint import print_saved_residuals

    from llama_jax import model as model_mod
    from llama_jax.ops import ATTENTION_LSE, ATTENTION_OUT

    sys.path.insert(0, str(ROOT / "scripts"))
    from saved_residuals import residual_bytes

    cfg = load_config("configs/tiny.yaml", ["model.remat=projections_and_attention",
                                            "model.compute_dtype=bfloat16",
                                            "model.scan_layers=false"]).model  # names kept
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    tokens = jnp.zeros((2, 64), jnp.int32)

    def residuals() -> str:  # JAX's public form of the list: printed
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens)), state)
        return printed.getvalue()

    now = residuals()
    policies = jax.checkpoint_policies
    monkeypatch.setitem(model_mod.REMAT_POLICIES, "projections_and_attention",
                        policies.save_from_both_policies(
                            policies.dots_with_no_batch_dims_saveable,
                            policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE)))
    before = residuals()
    assert now.count("named 'attention_q'") == cfg.num_layers
    assert now.count("named 'attention_k'") == cfg.num_layers
    assert "attention_q" not in before and "attention_k" not in before
    assert residual_bytes(now) <= residual_bytes(before)


def test_gpu_bench_script_runs(tmp_path):
    """scripts/gpu_bench.sh on the tiny preset (GPU_BENCH_QUICK=1): every variant runs and
    lands in the table with its ratio; the torch peer says it was skipped (no CUDA here)."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "GPU_BENCH_QUICK": "1", "PYTHON": sys.executable,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, (tmp_path / "gpu_bench.jsonl").open())}
    assert list(rows) == ["bf16-best", "fp8-delayed-head", "fp8", "fp8-delayed"]
    assert all(r["tokens_per_sec"] > 0 and r["loss"] > 0 for r in rows.values())
    assert "skipped" in done.stdout
    table = done.stdout[done.stdout.index("variant "):]
    assert all(name in table for name in rows) and "1.000x" in table
    # The bf16 best and first fp8 rows are traced: kernel time by kind in the row and the
    # table, the trace beside the logs; the device tool brings back at most 8 files.
    kernels = table[table.index("kernel ms per step"):].splitlines()
    for name in ("bf16-best", "fp8-delayed-head"):
        assert rows[name]["kernel_ms_by_kind"]["matmul"] > 0, rows[name]
        assert any(line.startswith(f"{name} ") for line in kernels), table
        assert (tmp_path / f"{name}.trace.json.gz").stat().st_size > 0
    assert "kernel_ms_by_kind" not in rows["fp8"] and "kernel_ms_by_kind" not in rows["fp8-delayed"]
    # no roofline on CPU devices (their rates are measured by `plan`, not in the chip table)
    assert "roof ms" in table and not any("predicted_step_s" in r for r in rows.values())
    assert len(list(tmp_path.iterdir())) <= 8, sorted(p.name for p in tmp_path.iterdir())
    logged = (tmp_path / "variants.log").read_text()
    assert all(f"== {name} (exit 0)" in logged for name in rows), logged[:2000]


def test_gpu_bench_runs_fp8_scanned_where_the_unrolled_compile_runs_out_of_time(tmp_path):
    """The fp8 rows run with the layers unrolled; where the first one runs out of time (exit
    124, as `timeout` reports it), it runs again scanned and so do the fp8 rows after it
    (named "-scanned"). A stand-in Python answers each `bench` at once with a row that says
    its settings (the unrolled fp8 one: out of time); the rest is the real interpreter."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
args=" $* "
if [[ $args != *" llama_jax.cli bench "* ]]; then exec {sys.executable} "$@"; fi
if [[ $args == *" model.fp8_head=true "* && $args == *" model.scan_layers=false "* ]]; then
  exit 124
fi
scan=true; [[ $args == *" model.scan_layers=false "* ]] && scan=false
fp8=none; [[ $args == *" model.quantization=fp8 "* ]] && fp8=fp8
echo '{{"tokens_per_sec": 100.0, "step_time_s": 0.5, "mfu": 0.5, "loss": 7.0, ' \
  '"scan": "'$scan'", "quantization": "'$fp8'"}}'
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_BENCH_QUICK": "1", "PYTHON": str(fake)}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gpu_bench.jsonl").open()]
    assert [(r["variant"], r["scan"], r["quantization"]) for r in rows] == [
        ("bf16-best", "false", "none"), ("fp8-delayed-head-scanned", "true", "fp8"),
        ("fp8-scanned", "true", "fp8"), ("fp8-delayed-scanned", "true", "fp8")]
    assert "== fp8-delayed-head: did not finish" in done.stdout
    assert "fp8-delayed-head-scanned" in done.stdout[done.stdout.index("variant "):]


def test_gpu_bench_skips_what_its_time_budget_cannot_hold(tmp_path):
    """With no time left every variant is skipped with a note, and with no row the script
    fails in one line rather than printing an empty table."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "GPU_BENCH_QUICK": "1", "GPU_BENCH_BUDGET_S": "1",
           "PYTHON": sys.executable, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == "no variant ran"
    skipped = [line for line in done.stdout.splitlines() if "budget left)" in line]
    assert [line.split(":")[0] for line in skipped] == [
        "== bf16-best", "== fp8-delayed-head", "== transformers + torch.compile", "== fp8",
        "== fp8-delayed"], done.stdout
    assert (tmp_path / "gpu_bench.jsonl").read_text() == ""


def test_gpu_bench_says_how_to_bring_omegaconf(tmp_path):
    """The GPU machine's image lacks omegaconf 2.4: `make gpu-deps` makes the folder the
    script puts on PYTHONPATH (checked here: it imports 2.4 from there), and without it the
    script ends in one line that says so before running anything."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    deps = tmp_path / "deps"
    made = subprocess.run(["make", "gpu-deps", f"GPU_DEPS={deps}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    version = subprocess.run([sys.executable, "-c", "import omegaconf; print(omegaconf.__version__,"
                              " omegaconf.__file__)"], env={**os.environ, "PYTHONPATH": str(deps)},
                             capture_output=True, text=True)
    assert version.stdout.startswith("2.4.") and str(deps) in version.stdout, version
    old = tmp_path / "old" / "omegaconf"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "2.1.0"\n')
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(old.parent)}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "make gpu-deps" in lines[0], done
    assert not (tmp_path / "out" / "variants.log").exists()


def test_gpu_bench_says_where_it_cannot_write(tmp_path):
    """An OUT_DIR that cannot be made (under a file here) ends the script in one line that
    names it, before anything runs."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.strip().splitlines() == [
        f"gpu_bench.sh: {out}: cannot write the results there"], done.stderr


@pytest.mark.slow  # the default variants above run in `make test`
def test_gpu_bench_long_context_variants_run(tmp_path):
    """GPU_BENCH_LONG=1 (tiny, quick): the long-context rows and the one-slice head row."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "GPU_BENCH_QUICK": "1", "GPU_BENCH_LONG": "1",
           "PYTHON": sys.executable, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [r["variant"] for r in map(json.loads, (tmp_path / "gpu_bench.jsonl").open())]
    assert rows == ["long-1024x1-projections_and_attention",
                    "long-512x2-projections_and_attention", "long-1024x1-unrolled",
                    "bf16-best", "bf16-best-one-slice"]


@pytest.mark.slow  # the default variants above run in `make test`
def test_gpu_bench_packed_rows_variants_run(tmp_path):
    """GPU_BENCH_PACKED=1 (tiny, quick): the bf16 best on one document per row, then on
    synthetic documents through the fused path and through the XLA blocks, then the default
    run's fp8 rows (one device call holds it all); the packed rows are really packed (their
    loss differs from the one-document rows', and is the same for both packed variants: the
    same batch, the same attention); no more files than the device tool brings back."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "GPU_BENCH_QUICK": "1", "GPU_BENCH_PACKED": "1",
           "PYTHON": sys.executable, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, (tmp_path / "gpu_bench.jsonl").open())}
    assert list(rows) == ["bf16-best", "packed-cudnn", "packed-xla-blocks", "fp8-delayed-head",
                          "fp8", "fp8-delayed"]
    assert len(list(tmp_path.iterdir())) <= 8, sorted(p.name for p in tmp_path.iterdir())
    assert rows["packed-cudnn"]["loss"] == pytest.approx(rows["packed-xla-blocks"]["loss"],
                                                         rel=1e-5)
    assert rows["packed-cudnn"]["loss"] != pytest.approx(rows["bf16-best"]["loss"], rel=1e-3)
    assert rows["packed-cudnn"]["kernel_ms_by_kind"]["matmul"] > 0


def test_loss_chunks_cut_the_compiled_steps_temporaries(tmp_path):
    """With 8 slices the float32 [B, T, V] logits (128 MiB per device here) never exist:
    XLA's own memory plan for the whole train step drops by more than their size."""
    shape = ["model.vocab_size=32768", "data.seq_len=1024", "model.max_position_embeddings=1024"]
    temp = {n: compile_only(tiny(tmp_path, *shape, f"model.loss_chunks={n}"))["temp_gib"] * 2**30
            for n in (1, 8)}
    logits_per_device = 8 * 1024 * 32768 * 4 / 8  # batch 8 over fsdp=8
    assert temp[8] < temp[1] - logits_per_device, temp


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_a_float32_weight_gradient_product_rounds_to_the_same_bf16(quantization):
    """`model.grad_reduce_dtype=float32` only moves where the weight gradient is rounded to
    bf16 (after the product, so after XLA's cross-device sum): on one device the gradients
    equal the bf16-output product's within one bf16 rounding, and come out in bf16."""
    from llama_jax.config import ModelConfig
    from llama_jax.ops import projection_matmul

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 32)) / 8, jnp.bfloat16)

    def grads(reduce: str) -> tuple[jax.Array, jax.Array]:
        cfg = ModelConfig(quantization=quantization, grad_reduce_dtype=reduce)
        matmul = projection_matmul(cfg)
        return jax.grad(lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32) ** 2),
                        argnums=(0, 1))(x, w)

    (dx32, dw32), (dx16, dw16) = grads("float32"), grads("compute")
    assert dw32.dtype == dw16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dx32, np.float32), np.asarray(dx16, np.float32))
    np.testing.assert_allclose(np.asarray(dw32, np.float32), np.asarray(dw16, np.float32),
                               rtol=2**-7, atol=1e-2)


def test_a_row_many_tokens_share_sums_its_gradient_in_float32():
    """An embedding row's gradient is the sum of every token's output gradient that looked it
    up. Autodiff adds them in the table's dtype: in bf16 each add rounds, and 4,096 tokens of
    one id lose most of it (on CPU as on a GPU). `model.grad_reduce_dtype=float32` sums
    each row in float32 and rounds once; `compute` keeps autodiff's sum."""
    from llama_jax.ops import embedding_lookup

    rng = np.random.default_rng(0)
    ids = np.where(rng.random(4096) < 0.9, 3, rng.integers(0, 16, 4096)).astype(np.int32)
    # each token's output gradient, exactly representable in bf16
    d_rows = (rng.standard_normal((4096, 32)) + 0.5).astype(jnp.bfloat16).astype(np.float32)
    exact = np.zeros((16, 32))
    np.add.at(exact, ids, d_rows.astype(np.float64))

    def grad(table: jax.Array, sum_in_f32: bool) -> np.ndarray:
        g = jax.jit(jax.grad(lambda t: jnp.sum(
            embedding_lookup(t, jnp.asarray(ids), ("vocab", "embed"), sum_in_f32)
            .astype(jnp.float32) * d_rows)))(table)
        assert g.dtype == table.dtype
        return np.asarray(g, np.float64)

    table = jnp.zeros((16, 32), jnp.bfloat16)
    np.testing.assert_allclose(grad(table, True), exact, rtol=2**-8, atol=1e-6)
    autodiff = jax.grad(lambda t: jnp.sum(
        jnp.take(t, jnp.asarray(ids), axis=0).astype(jnp.float32) * d_rows))(table)
    in_bf16 = grad(table, False)
    np.testing.assert_array_equal(in_bf16, np.asarray(autodiff, np.float64))
    # row 3 took ~3,700 gradients: bf16 sums are off by far more than one rounding
    assert np.abs(in_bf16[3] - exact[3]).max() > 8 * 2**-8 * np.abs(exact[3]).max()
    # a float32 table: autodiff's own numbers
    table32 = jnp.zeros((16, 32), jnp.float32)
    np.testing.assert_array_equal(grad(table32, True), grad(table32, False))
    np.testing.assert_allclose(grad(table32, True), exact, rtol=1e-5, atol=1e-4)


def test_loss_chunks_by_default_keep_a_slice_under_a_gib():
    # Llama 3.2 1B on one H200: batch 16 x 2048, 128k vocabulary = 16.8 GB of float32 logits
    assert auto_chunks(2048, 16 * 2048, 128256) == 16
    assert auto_chunks(2048, 16 * 2048, 128256, logits_bytes=2) == 8  # model.logits_dtype=bf16
    assert auto_chunks(256, 8 * 256, 32000) == 1  # small: one pass
    # a sequence split 4 ways stays split in every slice: T/n divisible by 4
    n = auto_chunks(32768, 8 * 32768 / 8, 128256, sequence_shards=4)
    assert (32768 // n) % 4 == 0 and 32768 * 128256 * 4 / n <= 2**30
    assert auto_chunks(96, 2**40, 1, sequence_shards=16) == 6  # 96 / 6 = 16: the most it can


def test_bf16_logits_take_half_the_default_slices(tmp_path):
    """The step's default slices count the logits in their own dtype: a vocabulary whose
    float32 logits take 4 slices under the limit takes 2 in bf16 (per device: batch 8 over
    the 8 devices' fsdp axis, 64 positions)."""
    from llama_jax.step import loss_chunks

    vocab = 4 * (1 << 30) // (64 * 4)  # 4 GiB of float32 logits per device's row

    def chunks(*overrides: str) -> int:
        return loss_chunks(make_setup(tiny(tmp_path, f"model.vocab_size={vocab}", *overrides)), 8)

    assert chunks() == 4 and chunks("model.logits_dtype=bfloat16") == 2


@pytest.mark.parametrize("overrides, message", [
    (["model.loss_chunks=5"], "model.loss_chunks=5 must divide data.seq_len=64"),
    (["model.loss_chunks=4", "train.fused_loss=false"], "needs train.fused_loss=true"),
])
def test_bad_loss_chunks_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, *overrides)
