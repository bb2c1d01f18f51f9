"""The kernels with hand-written gradients, behind plain functions: projections (`dense`,
`dense_to_f32`), attention (one `attention` dispatcher over our masked and causal-block kernels
and the fused ones), and the MLP's activation fused with its down projection.

Tensor names carry their shape as in `layers.py`. Each custom VJP exists because autodiff's
version costs measurably more on some platform (docs/performance.md); each is tested against
autodiff of the plain formula.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.config import ModelConfig
from llama_jax.fp8 import fp8_matmul
from llama_jax.sharding import constrain, is_sharded

Array = jax.Array
F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Matmuls with hand-written gradients


@jax.custom_vjp
def dense(x: Array, w: Array) -> Array:
    """`x @ w` over the last axis of `x` (`w` is 2-D), with the weight gradient taken as
    `transpose(x) @ dy`.

    Why: autodiff contracts over tokens with both operands token-major, and XLA:CPU's dot
    library (YNNPACK) then transposes one operand; it picks the output gradient, fused with the
    element-wise backward (SwiGLU's), a slow strided loop in every layer. Transposing the input
    instead (once, shared by the projections that read the same input) took 23% off an MLP's
    forward + backward on CPU (docs/performance.md). Same numbers, bit for bit.
    """
    return x @ w


def _dense_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return x @ w, (x, w)


def dense_bwd(residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, w = residuals
    dy = dy.astype(x.dtype)  # `dense_to_f32`'s float32 output gradient, to the compute dtype
    if is_sharded("length"):
        # Merging a batch split over one mesh axis and a length split over another into one
        # token axis makes XLA's partitioner gather the whole output gradient (for the LM
        # head: the [B, T, V] logits' gradient); contracting both axes in place does not.
        lead = tuple(range(x.ndim - 1))
        return dy @ jnp.transpose(w), jnp.tensordot(x, dy, axes=(lead, lead))
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ jnp.transpose(w), jnp.transpose(x2) @ dy2


dense.defvjp(_dense_fwd, dense_bwd)


@jax.custom_vjp
def dense_to_f32(x: Array, w: Array) -> Array:
    """`dense`, accumulated and returned in float32 whatever the operands' dtype (the LM
    head), with `dense`'s gradients taken in the operands' dtype.

    Why: autodiff of a bf16 x bf16 -> f32 product differentiates in f32 (the f32 output
    gradient meets the operands upcast to f32), so both gradient products of the LM head,
    a fifth of a 1B LLaMA's FLOPs at a 128k vocabulary, ran as f32/TF32 matmuls on a GPU.
    Casting the output gradient to the compute dtype first keeps them on the bf16 units, as
    the forward is (the usual mixed-precision recipe). In float32 it is `dense` exactly.
    """
    return jnp.matmul(x, w, preferred_element_type=F32)


def _dense_to_f32_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return dense_to_f32(x, w), (x, w)


dense_to_f32.defvjp(_dense_to_f32_fwd, dense_bwd)


Matmul = Callable[[Array, Array], Array]


def projection_matmul(cfg: ModelConfig) -> Matmul:
    """The product the block's projections use: `dense`, or an fp8 one with
    `model.quantization=fp8` (the LM head and attention stay in the compute dtype, as
    torchtitan's float8 recipes keep them)."""
    if cfg.quantization == "fp8":
        return fp8_matmul(cfg.fp8_gradients, cfg.fp8_weight_gradient)
    return dense


# ---------------------------------------------------------------------------------------------
# Attention


def attention_mask(segment_ids_BxT: Array | None, t: int, s: int, offset: Array | int = 0) -> Array:
    """Causal mask, restricted to tokens of the same document when rows are packed.

    `offset` is the position of query 0 among the keys (decoding with a KV cache).
    """
    q_idx = jnp.arange(t)[:, None] + offset
    k_idx = jnp.arange(s)[None, :]
    mask_1xTxS = (k_idx <= q_idx)[None]
    if segment_ids_BxT is not None:
        same_doc = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask_1xTxS = mask_1xTxS & same_doc
    return mask_1xTxS


def _masked_scores(q_BxKxGxTxH: Array, k_BxKxSxH: Array, mask_BxTxS: Array) -> Array:
    scores = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH, preferred_element_type=F32)
    return jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(F32).min)


def block_forward(q_BxKxGxTxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_BxTxS: Array,
                  out_dtype: jnp.dtype | None = None) -> tuple[Array, Array]:
    """Softmax attention on head-major operands (Q already scaled): the output [B, K, G, T, H]
    (in V's dtype unless `out_dtype`) and the log-sum-exp of each query's scores
    [B, K, G, T, 1] (float32)."""
    scores = _masked_scores(q_BxKxGxTxH, k_BxKxSxH, mask_BxTxS)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksh->bkgth", unnormalised.astype(v_BxKxSxH.dtype), v_BxKxSxH,
                     preferred_element_type=F32) / total
    return out.astype(out_dtype or v_BxKxSxH.dtype), peak + jnp.log(total)


def block_backward(q_BxKxGxTxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_BxTxS: Array,
                    out_BxKxGxTxH: Array, lse_BxKxGxTx1: Array, d_out_BxKxGxTxH: Array
                    ) -> tuple[Array, Array, Array]:
    """Gradients of `block_forward` for Q, K and V (the last two in float32), recomputing the
    probabilities from the log-sum-exp instead of reading stored ones (FlashAttention's
    backward): `d_scores = P * (dP - rowsum(dO * O))`."""
    cd = q_BxKxGxTxH.dtype
    probs = jnp.exp(_masked_scores(q_BxKxGxTxH, k_BxKxSxH, mask_BxTxS) - lse_BxKxGxTx1)
    d_probs = jnp.einsum("bkgth,bksh->bkgts", d_out_BxKxGxTxH, v_BxKxSxH,
                         preferred_element_type=F32)
    row = jnp.sum(d_out_BxKxGxTxH.astype(F32) * out_BxKxGxTxH.astype(F32), axis=-1,
                  keepdims=True)
    d_scores = (probs * (d_probs - row)).astype(cd)
    dq = jnp.einsum("bkgts,bksh->bkgth", d_scores, k_BxKxSxH)
    dk = jnp.einsum("bkgts,bkgth->bksh", d_scores, q_BxKxGxTxH, preferred_element_type=F32)
    dv = jnp.einsum("bkgts,bkgth->bksh", probs.astype(cd), d_out_BxKxGxTxH,
                    preferred_element_type=F32)
    return dq, dk, dv


# Names a remat policy can save (model.REMAT_POLICIES): the attention output and its
# log-sum-exp are all its backward needs besides Q, K and V.
ATTENTION_OUT, ATTENTION_LSE = "attention_out", "attention_lse"


def _named_for_remat(out: Array, lse: Array) -> tuple[Array, Array]:
    return checkpoint_name(out, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)


@jax.custom_vjp
def _masked_attention(q_BxKxGxTxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array,
                      mask_BxTxS: Array) -> Array:
    """`block_forward` under any mask, with the recomputing backward."""
    return block_forward(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS)[0]


def _masked_attention_fwd(q: Array, k: Array, v: Array, mask: Array
                          ) -> tuple[Array, tuple[Array, ...]]:
    out, lse = _named_for_remat(*block_forward(q, k, v, mask))
    return out, (q, k, v, mask, out, lse)


def _masked_attention_bwd(residuals: tuple[Array, ...], d_out: Array
                          ) -> tuple[Array, Array, Array, None]:
    _, k, v = residuals[:3]
    dq, dk, dv = block_backward(*residuals, d_out)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_masked_attention.defvjp(_masked_attention_fwd, _masked_attention_bwd)


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _causal_block_mask(segment_ids_BxT: Array | None, start: int, end: int) -> Array:
    """Mask of queries `start:end` over keys `:end`: causal, within one document if packed."""
    mask_BxQxS = attention_mask(None, end - start, end, start)
    if segment_ids_BxT is not None:
        same_doc = segment_ids_BxT[:, start:end, None] == segment_ids_BxT[:, None, :end]
        mask_BxQxS = mask_BxQxS & same_doc
    return mask_BxQxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_blocks(q_BxKxGxTxH: Array, k_BxKxTxH: Array, v_BxKxTxH: Array,
                   segment_ids_BxT: Array | None, block: int) -> Array:
    return _causal_blocks_fwd(q_BxKxGxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT, block)[0]


def _causal_blocks_fwd(q: Array, k: Array, v: Array, segment_ids: Array | None, block: int
                       ) -> tuple[Array, tuple[Array | None, ...]]:
    outs, lses = [], []
    for start, end in _query_blocks(q.shape[3], block):
        out, lse = block_forward(q[:, :, :, start:end], k[:, :, :end], v[:, :, :end],
                                  _causal_block_mask(segment_ids, start, end))
        outs.append(out)
        lses.append(lse)
    out, lse = _named_for_remat(jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3))
    return out, (q, k, v, segment_ids, out, lse)


def _causal_blocks_bwd(block: int, residuals: tuple[Array | None, ...], d_out: Array
                       ) -> tuple[Array, Array, Array, None]:
    q, k, v, segment_ids, out, lse = residuals
    dqs, dk, dv = [], None, None
    # Last block first: it reads every key, so its K/V gradients start the sums.
    for start, end in reversed(_query_blocks(q.shape[3], block)):
        rows = slice(start, end)
        dq_i, dk_i, dv_i = block_backward(
            q[:, :, :, rows], k[:, :, :end], v[:, :, :end],
            _causal_block_mask(segment_ids, start, end), out[:, :, :, rows], lse[:, :, :, rows],
            d_out[:, :, :, rows])
        dqs.append(dq_i)
        dk = dk_i if dk is None else dk.at[:, :, :end].add(dk_i)
        dv = dv_i if dv is None else dv.at[:, :, :end].add(dv_i)
    dq = jnp.concatenate(dqs[::-1], axis=3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)


def to_head_major(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, scale: float
                   ) -> tuple[Array, Array, Array]:
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxKxGxTxH = (q_BxTxNxH * scale).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    return q_BxKxGxTxH, k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)


def from_head_major(out_BxKxGxTxH: Array) -> Array:
    b, k, g, t, h = out_BxKxGxTxH.shape
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def xla_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxTxS: Array,
                  scale: float) -> Array:
    """Grouped-query attention as one einsum per side; K/V are never repeated in memory.

    Q, K and V are moved to head-major layout first, so that both products are plain batched
    matmuls over (batch, kv head) and the [.., T, S] scores are written and read contiguously:
    otherwise XLA:CPU transposes the scores (and their gradient), the largest tensors of the
    layer. The scale is applied to Q, the smaller operand.
    """
    q, k, v = to_head_major(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale)
    return from_head_major(_masked_attention(q, k, v, mask_BxTxS))


def blocked_causal_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array,
                             segment_ids_BxT: Array | None, scale: float, block: int) -> Array:
    """Causal self-attention by query blocks: block i attends only to keys before its end.

    Why: the one-einsum form computes, masks, normalises and stores all T x T scores although
    causality throws half of them away; the scores and their gradient are the layer's
    largest tensors. With blocks of `block` queries the work is (n + 1) / 2n of it for n
    blocks (62% at n = 4), the same numbers up to float rounding; the last block may be
    shorter. Plain XLA ops, so it runs, shards and differentiates wherever the one-einsum form
    does (docs/performance.md).
    """
    q, k, v = to_head_major(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale)
    return from_head_major(_causal_blocks(q, k, v, segment_ids_BxT, block))


def attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
              segment_ids_BxT: Array | None, *, impl: str, scale: float,
              mask_BxTxS: Array | None = None, block: int = 0) -> Array:
    """Causal attention within documents (`segment_ids`; None: one document per row), or under
    an explicit `mask` (decoding over a cache), on a sequence held whole by each device.
    `impl`: "xla" (our kernels: query blocks of `block` rows when that splits the sequence,
    else one masked einsum), or a fused kernel through `jax.nn.dot_product_attention`
    ("cudnn", or "dot_product_attention" for JAX's choice) for rows of one document. Packed
    rows never reach the fused kernel: JAX's public API takes document boundaries only as a
    dense [B, 1, T, T] mask, so they take the query blocks instead."""
    t = q_BxTxNxH.shape[1]
    if mask_BxTxS is not None:
        return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale)
    if impl == "xla" or segment_ids_BxT is not None:
        if 0 < block < t and t == k_BxSxKxH.shape[1]:
            return blocked_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                                            scale, block)
        mask = attention_mask(segment_ids_BxT, t, k_BxSxKxH.shape[1])
        return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale)
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=scale, is_causal=True,
        implementation="cudnn" if impl == "cudnn" else None,
    )


def _mlp_hidden(activation: str, up_BxTxF: Array, gate_BxTxF: Array | None = None) -> Array:
    if activation == "swiglu":
        h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    else:
        h_BxTxF = jax.nn.gelu(up_BxTxF, approximate=False)
    return constrain(h_BxTxF, ("batch", "length", "mlp"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def activation_down(activation: str, matmul: Matmul, up_BxTxF: Array, gate_BxTxF: Array | None,
                    w_FxD: Array) -> Array:
    """`matmul(act(gate, up), w)`, the MLP after its input projections, keeping only the
    projections' outputs for the backward and recomputing the activation there.

    Why: autodiff keeps every intermediate of SwiGLU (the gate, its sigmoid, silu, the product)
    for the backward, each as wide as the MLP; under `scan_layers` each becomes a stacked
    [layers, B, T, F] buffer that is zero-filled and copied every step. Recomputing them is a
    few element-wise ops that fuse into the backward's loops (docs/performance.md).
    """
    return matmul(_mlp_hidden(activation, up_BxTxF, gate_BxTxF), w_FxD)


def _activation_down_fwd(activation: str, matmul: Matmul, up: Array, gate: Array | None,
                         w: Array) -> tuple[Array, tuple[Array | None, ...]]:
    return activation_down(activation, matmul, up, gate, w), (up, gate, w)


def _activation_down_bwd(activation: str, matmul: Matmul, residuals: tuple[Array | None, ...],
                         dy: Array) -> tuple[Array, Array | None, Array]:
    up, gate, w = residuals
    inputs = (up,) if gate is None else (up, gate)
    h, pullback = jax.vjp(functools.partial(_mlp_hidden, activation), *inputs)
    # The product's own backward; its unused forward output is dead code under jit.
    dh, dw = jax.vjp(matmul, h, w)[1](dy)
    d_up, *d_gate = pullback(dh)
    return d_up, (d_gate[0] if d_gate else None), dw


activation_down.defvjp(_activation_down_fwd, _activation_down_bwd)
