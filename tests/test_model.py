"""Model properties that hold for any correct decoder, checked on tiny shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.config import load_config
from llama_jax.layers import Attention, apply_rope, rope_inv_freq
from llama_jax.model import Transformer, stack_layers, unstack_layers
from llama_jax.ops import attention_mask, blocked_causal_attention, xla_attention

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls

NEOX = ["model.norm=layernorm", "model.activation=gelu", "model.parallel_residual=true",
        "model.rotary_pct=0.5", "model.attention_bias=true", "model.mlp_bias=true"]


def model_cfg(overrides, extra=()):
    return load_config("configs/tiny.yaml", [*overrides, *extra]).model


def tokens(cfg, batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


LEARNED_TIED = ["model.position=learned", "model.tie_embeddings=true"]


@pytest.mark.parametrize("arch", [[], NEOX, LEARNED_TIED], ids=["llama", "neox", "learned-tied"])
def test_causal(tiny_overrides, arch):
    cfg = model_cfg(tiny_overrides, arch)
    model = Transformer(cfg, nnx.Rngs(0))
    x = tokens(cfg)
    t = 9
    x2 = x.at[:, t].set((x[:, t] + 1) % cfg.vocab_size)
    a, b = model(x), model(x2)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_rope_depends_on_relative_position_only(tiny_overrides):
    cfg = model_cfg(tiny_overrides)
    inv_freq = rope_inv_freq(cfg)
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, cfg.head_size))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, cfg.head_size))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), inv_freq)
        kn = apply_rope(k, jnp.array([[n]]), inv_freq)
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4, abs=1e-5)
    assert score(5, 2) == pytest.approx(score(3, 0), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_partial_rotary_leaves_tail_untouched(tiny_overrides):
    cfg = model_cfg(tiny_overrides, ["model.rotary_pct=0.5"])
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, cfg.head_size))
    out = apply_rope(x, jnp.arange(4)[None] + 3, rope_inv_freq(cfg))
    np.testing.assert_array_equal(out[..., cfg.rotary_dim:], x[..., cfg.rotary_dim:])
    assert not np.allclose(out[..., :cfg.rotary_dim], x[..., :cfg.rotary_dim])


def test_llama3_rope_scaling_matches_reference_rule():
    cfg = load_config("configs/llama3.2-1b.yaml").model
    ours = rope_inv_freq(cfg)
    # Meta's reference implementation (llama-models apply_scaling), written independently.
    base = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    factor, low, high, old = 32.0, 1.0, 4.0, 8192
    expected = []
    for freq in base:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            expected.append(freq)
        elif wavelen > old / low:
            expected.append(freq / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append((1 - smooth) * freq / factor + smooth * freq)
    np.testing.assert_allclose(ours, np.array(expected), rtol=1e-6)
    linear = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling,
                                                                        type="linear", factor=4.0))
    np.testing.assert_allclose(rope_inv_freq(linear), base / 4.0, rtol=1e-6)


def test_gqa_equals_mha_with_repeated_kv(tiny_overrides):
    gqa_cfg = model_cfg(tiny_overrides)  # 4 heads, 2 kv heads
    mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=4)
    gqa = Attention(gqa_cfg, nnx.Rngs(0))
    mha = Attention(mha_cfg, nnx.Rngs(1))
    group = gqa_cfg.num_heads // gqa_cfg.kv_heads
    mha.q_proj[...] = gqa.q_proj[...]
    mha.o_proj[...] = gqa.o_proj[...]
    mha.k_proj[...] = jnp.repeat(gqa.k_proj[...], group, axis=1)
    mha.v_proj[...] = jnp.repeat(gqa.v_proj[...], group, axis=1)
    x = jax.random.normal(jax.random.key(3), (2, 16, gqa_cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    np.testing.assert_allclose(gqa(x, pos, None), mha(x, pos, None), rtol=1e-5, atol=1e-6)


def _loss_and_grads(cfg, params, x):
    graphdef = nnx.split(Transformer(cfg, nnx.Rngs(0)))[0]

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("arch", [[], NEOX], ids=["llama", "neox"])
def test_scanned_and_unrolled_agree(tiny_overrides, arch):
    scanned_cfg = model_cfg(tiny_overrides, arch)
    unrolled_cfg = dataclasses.replace(scanned_cfg, scan_layers=False)
    params = nnx.to_pure_dict(nnx.state(Transformer(scanned_cfg, nnx.Rngs(0))))
    x = tokens(scanned_cfg)
    loss_s, grads_s = _loss_and_grads(scanned_cfg, params, x)
    loss_u, grads_u = _loss_and_grads(unrolled_cfg, unstack_layers(params), x)
    assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(stack_layers(grads_u)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                                    "projections_and_attention"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_changes_no_gradient(tiny_overrides, policy, scan):
    base = dataclasses.replace(model_cfg(tiny_overrides), scan_layers=scan)
    params = nnx.to_pure_dict(nnx.state(Transformer(base, nnx.Rngs(0))))
    x = tokens(base)
    _, plain = jax.jit(lambda p: _loss_and_grads(base, p, x))(params)
    remat_cfg = dataclasses.replace(base, remat=policy)
    _, remat = jax.jit(lambda p: _loss_and_grads(remat_cfg, p, x))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("block", [0, 4], ids=["one-einsum", "causal-blocks"])
def test_projections_and_attention_policy_recomputes_no_matmul(tiny_overrides, block):
    """The policy keeps every matmul output and the attention's output and log-sum-exp, so
    the backward repeats no matmul of the forward (as `dots_with_no_batch_dims_saveable`
    repeats the attention's); only element-wise work is recomputed."""
    def matmuls(policy):
        cfg = dataclasses.replace(model_cfg(tiny_overrides), remat=policy, attention_block=block)
        params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))
        hlo = jax.jit(lambda p: _loss_and_grads(cfg, p, tokens(cfg))).lower(params).as_text()
        return hlo.count("stablehlo.dot_general")

    assert matmuls("projections_and_attention") == matmuls("none")
    assert matmuls("dots_with_no_batch_dims_saveable") > matmuls("none")


def test_packed_documents_do_not_see_each_other(tiny_overrides):
    cfg = model_cfg(tiny_overrides)
    model = Transformer(cfg, nnx.Rngs(0))
    x = tokens(cfg, batch=1)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    x_changed = x.at[:, :6].set((x[:, :6] + 7) % cfg.vocab_size)
    a = model(x, pos, seg)
    b = model(x_changed, pos, seg)
    np.testing.assert_allclose(a[:, 6:], b[:, 6:], rtol=1e-5, atol=1e-6)
    # Document 2 alone, from position 0, gives the same logits as inside the packed row.
    alone = model(x[:, 6:])
    np.testing.assert_allclose(a[:, 6:], alone, rtol=1e-4, atol=1e-5)


def test_mixed_precision_keeps_fp32_params_and_logits(tiny_overrides):
    cfg = model_cfg(tiny_overrides, ["model.compute_dtype=bfloat16"])
    model = Transformer(cfg, nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model)))
    logits = model(tokens(cfg))
    assert logits.dtype == jnp.float32
    full = Transformer(dataclasses.replace(cfg, compute_dtype="float32"), nnx.Rngs(0))(tokens(cfg))
    # bf16 keeps 8 bits of mantissa (0.4%); through two layers the logits differ by about
    # 0.5% (relative norm). Not zero: the bf16 path really ran.
    rel = float(jnp.linalg.norm(logits - full) / jnp.linalg.norm(full))
    assert 1e-4 < rel < 2e-2


def test_mixed_precision_lm_head_gradient_stays_in_bf16(tiny_overrides):
    """Every matmul that touches the vocabulary runs on bf16 operands, forward and backward
    (autodiff alone would run the two gradient products in f32), and the gradients stay close
    to the float32 model's."""
    cfg = model_cfg(tiny_overrides, ["model.compute_dtype=bfloat16"])
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))
    x = tokens(cfg)

    def grads_fn(c):
        def loss(p):
            model = nnx.merge(nnx.split(Transformer(c, nnx.Rngs(0)))[0], p)
            return jnp.mean(jax.nn.log_softmax(model(x))[..., 0])
        return jax.jit(jax.grad(loss))

    hlo = grads_fn(cfg).lower(params).as_text()
    vocab_dots = [line for line in hlo.splitlines()
                  if "dot_general" in line and f"x{cfg.vocab_size}x" in line.split(":")[-1]
                  or "dot_general" in line and f"<{cfg.vocab_size}x" in line.split(":")[-1]]
    assert len(vocab_dots) == 3, vocab_dots  # the forward and the two gradient products
    for line in vocab_dots:
        operands = line.split(":")[-1].split("->")[0]
        assert "f32>" not in operands, line
    bf16_grads = grads_fn(cfg)(params)
    f32_grads = grads_fn(dataclasses.replace(cfg, compute_dtype="float32"))(params)
    # Every gradient within a few bf16 roundings (about 0.4-1% relative norm measured).
    for a, b in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(f32_grads), strict=True):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 3e-2


def test_dot_product_attention_matches_xla(tiny_overrides):
    cfg = model_cfg(tiny_overrides)
    model = Transformer(cfg, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model))
    dpa_cfg = dataclasses.replace(cfg, attention="dot_product_attention")
    other = nnx.merge(nnx.split(Transformer(dpa_cfg, nnx.Rngs(0)))[0], params)
    x = tokens(cfg)
    seg = jnp.array([[1] * 5 + [2] * 11, [1] * 16])
    pos = jnp.array([list(range(5)) + list(range(11)), list(range(16))])
    np.testing.assert_allclose(model(x), other(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(x, pos, seg), other(x, pos, seg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [0, 16, 7], ids=["one-einsum", "blocks-16", "blocks-7"])
def test_attention_gradients_match_autodiff_of_plain_softmax(block):
    """The hand-written attention backward (probabilities recomputed from the log-sum-exp)
    against autodiff of textbook softmax attention with K/V repeated per query head: output
    and the Q, K, V gradients, packed rows with a document edge inside a block."""
    b, t, n, k, h = 2, 50, 6, 2, 16
    rng = np.random.default_rng(0)
    q, key, v, w = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
                    [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)])
    seg = jnp.array([[1] * 20 + [2] * 30, [1] * 50])
    scale = h ** -0.5
    mask = attention_mask(seg, t, t)

    def textbook(q, key, v):
        key, v = jnp.repeat(key, n // k, axis=2), jnp.repeat(v, n // k, axis=2)
        scores = jnp.einsum("btnh,bsnh->bnts", q, key) * scale
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)

    def ours(q, key, v):
        if block == 0:
            return xla_attention(q, key, v, mask, scale)
        return blocked_causal_attention(q, key, v, seg, scale, block)

    def value_and_grads(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(
            q, key, v)

    np.testing.assert_allclose(ours(q, key, v), textbook(q, key, v), rtol=1e-5, atol=1e-5)
    got, want = value_and_grads(ours), value_and_grads(textbook)
    for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("block", [4, 6])
def test_blocked_causal_attention_matches_one_block(tiny_overrides, block):
    """Query blocks (the CPU fast path) give the one-einsum logits and gradients, packed rows
    included, with document boundaries inside and across blocks, and a shorter last block."""
    cfg = model_cfg(tiny_overrides, ["model.attention_block=0"])
    blocked_cfg = dataclasses.replace(cfg, attention_block=block)
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))
    x = tokens(cfg)
    seg = jnp.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16])
    pos = jnp.array([list(range(5)) + list(range(7)) + list(range(4)), list(range(16))])

    def loss_and_grads(c):
        def loss(p):
            model = nnx.merge(nnx.split(Transformer(c, nnx.Rngs(0)))[0], p)
            logits = model(x, pos, seg)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, full_logits), full_grads = loss_and_grads(cfg)
    (_, blocked_logits), blocked_grads = loss_and_grads(blocked_cfg)
    np.testing.assert_allclose(blocked_logits, full_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
