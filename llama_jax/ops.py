"""The kernels with hand-written gradients, behind plain functions: projections (`dense`,
`head_matmul`), the embedding lookup, attention (one `attention` dispatcher over our masked
and causal-block kernels and the fused ones), and the MLP's activation fused with its down
projection.

Tensor names carry their shape as in `layers.py`. Each custom VJP exists because autodiff's
version costs measurably more on some platform (docs/performance.md) or, for the lookup, sums
in too narrow a dtype; each is tested against autodiff of the plain formula.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.config import ModelConfig
from llama_jax.fp8 import (
    E4M3,
    GRADIENT_FORMATS,
    Fp8Weight,
    Scaled,
    current_scale,
    fp8_matmul,
    gradient_products,
    quantized,
    scaled_dot,
)
from llama_jax.sharding import constrain, is_sharded

Array = jax.Array
F32 = jnp.float32
NEG = float(jnp.finfo(jnp.float32).min)  # a masked score: exp() of it minus any real one is 0


# ---------------------------------------------------------------------------------------------
# Matmuls with hand-written gradients


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, w: Array, reduce_in_f32: bool = False) -> Array:
    """`x @ w` over the last axis of `x` (`w` is 2-D), with the weight gradient taken as
    `transpose(x) @ dy`.

    Why: autodiff contracts over tokens with both operands token-major, and XLA:CPU's dot
    library (YNNPACK) then transposes one operand; it picks the output gradient, fused with the
    element-wise backward (SwiGLU's), a slow strided loop in every layer. Transposing the input
    instead (once, shared by the projections that read the same input) took 23% off an MLP's
    forward + backward on CPU (docs/performance.md). Same numbers, bit for bit.
    `reduce_in_f32`: the weight gradient leaves its product in float32 (see `dense_bwd`).
    """
    return x @ w


def _dense_fwd(x: Array, w: Array, reduce_in_f32: bool = False
               ) -> tuple[Array, tuple[Array, Array]]:
    return x @ w, (x, w)


def _dense_bwd(reduce_in_f32: bool, residuals: tuple[Array, Array], dy: Array
               ) -> tuple[Array, Array]:
    return dense_bwd(residuals, dy, reduce_in_f32=reduce_in_f32)


def dense_bwd(residuals: tuple[Array, Array], dy: Array, weight_dtype: jnp.dtype | None = None,
              reduce_in_f32: bool = False) -> tuple[Array, Array]:
    """The input and weight gradients of `x @ w`; the weight's accumulated in float32 and
    returned in `weight_dtype` (default: the operands' dtype). `reduce_in_f32`
    (`model.grad_reduce_dtype=float32`): the product's output is float32, cast after; the
    weight gradient is a sum over tokens that XLA's partitioner completes across the devices
    holding them right at the product, so its output dtype is the dtype of that sum (bf16
    under bf16 compute otherwise, on a GPU; docs/performance.md, session 20)."""
    x, w = residuals
    dy = dy.astype(x.dtype)  # the LM head's float32 output gradient, to the compute dtype
    out = weight_dtype or x.dtype
    product = jnp.float32 if reduce_in_f32 else out
    if is_sharded("length"):
        # Merging a batch split over one mesh axis and a length split over another into one
        # token axis makes XLA's partitioner gather the whole output gradient (for the LM
        # head: the [B, T, V] logits' gradient); contracting both axes in place does not.
        lead = tuple(range(x.ndim - 1))
        return dy @ jnp.transpose(w), jnp.tensordot(
            x, dy, axes=(lead, lead), preferred_element_type=product).astype(out)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ jnp.transpose(w), jnp.matmul(
        jnp.transpose(x2), dy2, preferred_element_type=product).astype(out)


dense.defvjp(_dense_fwd, _dense_bwd)


@dataclasses.dataclass(frozen=True)
class HeadProduct:
    """How the LM head's products run ([..., D] x [D, V] -> logits in `logits_dtype`,
    accumulated in float32, and its two gradient products): in the compute dtype, or with
    `model.fp8_head` in fp8, each operand in E4M3 (the logits gradient in
    `model.fp8_gradients`) scaled by its current amax. Hashable: a static argument of the
    head's and the fused loss's custom VJPs.

    Why current scaling even under `model.fp8_scaling=delayed`: the head is one product per
    step, outside the layer stack, so a stale scale would buy little fusion, while the
    logits gradient's range follows the model's confidence, which moves fast early on.
    """

    fp8: bool = False
    gradient_format: str = "e4m3"
    weight_gradient: str = "fp8"
    logits_dtype: str = "float32"
    reduce_in_f32: bool = False  # model.grad_reduce_dtype=float32 (ops.dense_bwd)

    @classmethod
    def of(cls, cfg: ModelConfig) -> HeadProduct:
        f32 = cfg.reduce_grads_in_f32
        if cfg.fp8_head:
            return cls(True, cfg.fp8_gradients, cfg.fp8_weight_gradient, cfg.logits_dtype, f32)
        return cls(logits_dtype=cfg.logits_dtype, reduce_in_f32=f32)

    def operand(self, a: Array) -> Array | Scaled:
        """x or w as the products take it: itself, or quantised once for the forward and the
        backward (the fp8 values are the residuals: half the bytes of bf16)."""
        return quantized(a, E4M3)[0] if self.fp8 else a

    def logits(self, x: Array | Scaled, w: Array | Scaled) -> Array:
        """Logits of operands from `operand`, in `logits_dtype` (the GEMM accumulates in
        float32 and rounds its output once)."""
        dtype = jnp.dtype(self.logits_dtype)
        if isinstance(x, Scaled):
            return scaled_dot(x, w, ((x.values.ndim - 1,), (0,)), dtype)
        return jnp.matmul(x, w, preferred_element_type=dtype)

    def gradients(self, x: Array | Scaled, w: Array | Scaled, d_logits: Array,
                  weight_dtype: jnp.dtype | None = None) -> tuple[Array, Array]:
        """The input's and the weight's gradients for a logits gradient in the compute
        dtype; the weight's in `weight_dtype` (default: the operands' dtype). The sliced
        loss asks for float32, so that its running sum over slices is the GEMM's own
        accumulation (loss.chunked_head_loss_sums)."""
        if isinstance(x, Scaled):
            fp8_dtype = GRADIENT_FORMATS[self.gradient_format]
            # Scaled by its own amax (current scaling), taken in the pass that makes the
            # gradient; the barrier keeps that pass's output in the compute dtype. Without
            # it XLA drops the rounding to bf16 (it removes f32 -> bf16 -> f32 converts as
            # excess precision), so that pass wrote the [B, T, V] gradient in float32 and
            # the cast to fp8 read it back (docs/performance.md, session 20).
            scale = current_scale(jnp.max(jnp.abs(d_logits)).astype(jnp.float32), fp8_dtype)
            g, _ = quantized(jax.lax.optimization_barrier(d_logits), fp8_dtype, scale)
            return gradient_products(x, w, g, d_logits, self.weight_gradient == "fp8",
                                     weight_dtype, self.reduce_in_f32)
        return dense_bwd((x, w), d_logits, weight_dtype, self.reduce_in_f32)


HEAD_IN_COMPUTE_DTYPE = HeadProduct()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def head_matmul(x: Array, w: Array, product: HeadProduct) -> Array:
    """The LM head `x @ w` (`w` [D, V]), accumulated and returned in float32 whatever the
    operands' dtype, with the gradient products taken in the operands' dtype (or in fp8, as
    `product` says).

    Why: autodiff of a bf16 x bf16 -> f32 product differentiates in f32 (the f32 output
    gradient meets the operands upcast to f32), so both gradient products of the LM head,
    a fifth of a 1B LLaMA's FLOPs at a 128k vocabulary, ran as f32/TF32 matmuls on a GPU.
    Casting the output gradient to the compute dtype first keeps them on the bf16 units, as
    the forward is (the usual mixed-precision recipe). In float32 it is `dense` exactly.
    """
    return _head_matmul_fwd(x, w, product)[0]


def _head_matmul_fwd(x: Array, w: Array, product: HeadProduct
                     ) -> tuple[Array, tuple[Array | Scaled, Array | Scaled]]:
    operands = product.operand(x), product.operand(w)
    return product.logits(*operands), operands


def _head_matmul_bwd(product: HeadProduct, operands: tuple[Array | Scaled, Array | Scaled],
                     dy: Array) -> tuple[Array, Array]:
    x, w = operands
    return product.gradients(x, w, dy.astype(x.dtype))


head_matmul.defvjp(_head_matmul_fwd, _head_matmul_bwd)


# The weight is an `Fp8Weight` (with its delayed scales) only for the fp8 product.
Matmul = Callable[[Array, Array | Fp8Weight], Array]


def projection_matmul(cfg: ModelConfig) -> Matmul:
    """The product the block's projections use: `dense`, or an fp8 one with
    `model.quantization=fp8` (attention stays in the compute dtype, and the LM head too
    unless `model.fp8_head`, as torchtitan's float8 recipes keep them)."""
    if cfg.quantization == "fp8":
        return fp8_matmul(cfg.fp8_gradients, cfg.fp8_weight_gradient, cfg.reduce_grads_in_f32)
    return functools.partial(dense, reduce_in_f32=cfg.reduce_grads_in_f32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def embedding_lookup(table_VxD: Array, ids_BxT: Array, table_axes: tuple[str, str],
                     sum_in_f32: bool = False) -> Array:
    """The table's rows at `ids` (`jnp.take` on axis 0). The table (a parameter with logical
    axes `table_axes`) is gathered along its second axis first, and its gradient, a sum of
    every token's output gradient into its row, is summed in float32 when `sum_in_f32`
    (`model.grad_reduce_dtype=float32`) and handed back split as the table is.

    Why the float32 sum: autodiff scatter-adds in the table's dtype, so under bf16 compute
    each add rounds to bf16 and a row that thousands of tokens share loses most of its sum
    (4,096 gradients of 1.0 add up to 256, on a GPU as on CPU); torch's CUDA embedding
    backward sums each row in float32 too (its CPU one does not). Why the gathers: a gather
    from a table split on both axes cannot be partitioned without replicating it (FSDP
    gathers every weight so); the gradient made to leave split as the table is lets XLA's
    partitioner reduce-scatter it in the sum's dtype, or send the tokens' gradients to the
    rows' devices when that is fewer bytes (left to itself it all-reduced the float32 table
    and sliced it).
    """
    return _lookup_fwd(table_VxD, ids_BxT, table_axes)[0]


def _lookup_fwd(table_VxD: Array, ids_BxT: Array, table_axes: tuple[str, str],
                sum_in_f32: bool = False) -> tuple[Array, tuple[Array, Array]]:
    rows = jnp.take(constrain(table_VxD, (table_axes[0], None)), ids_BxT, axis=0)
    # The table is a residual for its shape and dtype only: a parameter, alive anyway.
    return rows, (table_VxD, ids_BxT)


def _lookup_bwd(table_axes: tuple[str, str], sum_in_f32: bool,
                residuals: tuple[Array, Array], d_rows: Array) -> tuple[Array, None]:
    table, ids = residuals
    dtype = jnp.float32 if sum_in_f32 else table.dtype
    sums = jnp.zeros(table.shape, dtype).at[ids].add(d_rows.astype(dtype), mode="drop")
    return constrain(sums, table_axes).astype(table.dtype), None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)


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
# log-sum-exp are all its backward needs besides Q, K and V; Q and K as attention takes them
# (rotated: layers.Attention names them), so that the backward need not rotate them again.
ATTENTION_OUT, ATTENTION_LSE = "attention_out", "attention_lse"
ATTENTION_Q, ATTENTION_K = "attention_q", "attention_k"


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


def visible(q_pos_BxQ: Array, k_pos_BxS: Array, q_seg_BxQ: Array | None,
            k_seg_BxS: Array | None) -> Array:
    """[B, Q, S]: key not after the query (by position in its document) and, in packed rows,
    of the same document. From positions rather than indices, so it holds whatever order the
    tokens are laid out in (context parallelism reorders them)."""
    mask = k_pos_BxS[:, None, :] <= q_pos_BxQ[:, :, None]
    if q_seg_BxQ is not None:
        mask = mask & (k_seg_BxS[:, None, :] == q_seg_BxQ[:, :, None])
    return mask


def _may_see(q_pos_BxQ: Array, k_pos_BxS: Array, q_seg_BxQ: Array | None,
             k_seg_BxS: Array | None) -> Array:
    """Whether a block pair can hold a visible pair, from per-row extremes: skipped are key
    blocks wholly after the queries in position (one document per row), and in packed rows key
    blocks whose documents all differ from the queries', or share only document s (the last
    of the queries', the first of the keys') with its keys all after its queries. Exact for
    those cases, conservative otherwise, whatever the tokens' order. Never builds the
    [B, Q, S] mask, which as a `lax.cond` operand JAX would hoist out of the layer loop."""
    if q_seg_BxQ is None:
        return jnp.any(jnp.min(k_pos_BxS, axis=1) <= jnp.max(q_pos_BxQ, axis=1))
    lo_q, hi_q = jnp.min(q_seg_BxQ, axis=1), jnp.max(q_seg_BxQ, axis=1)
    lo_k, hi_k = jnp.min(k_seg_BxS, axis=1), jnp.max(k_seg_BxS, axis=1)
    overlap = (lo_k <= hi_q) & (lo_q <= hi_k)
    in_s_k = k_seg_BxS == hi_q[:, None]
    in_s_q = q_seg_BxQ == hi_q[:, None]
    first_key = jnp.min(jnp.where(in_s_k, k_pos_BxS, jnp.iinfo(jnp.int32).max), axis=1)
    last_query = jnp.max(jnp.where(in_s_q, q_pos_BxQ, -1), axis=1)
    only_s_and_later = (hi_q == lo_k) & (first_key > last_query)
    return jnp.any(overlap & ~only_s_and_later)


def _pair_scores(qb: Array, kb: Array, q_pos: Array, k_pos: Array, q_seg: Array | None,
                 k_seg: Array | None) -> tuple[Array, Array]:
    """A block pair's visibility [B, 1, 1, Q, S] and float32 scores [B, K, G, Q, S]."""
    scores = jnp.einsum("bkgth,bksh->bkgts", qb, kb, preferred_element_type=F32)
    return visible(q_pos, k_pos, q_seg, k_seg)[:, None, None], scores


def _divisor_at_most(n: int, block: int) -> int:
    block = min(block, n) if block > 0 else n
    return max(d for d in range(1, block + 1) if n % d == 0)


def _slice(a: Array | None, start: Array, size: int, axis: int) -> Array | None:
    return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _flash_forward(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                  q_seg: Array | None, k_seg: Array | None, block: int,
                  start: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
    """Head-major attention (Q [B, K, G, T, H] already scaled, K/V [B, K, S, H]) of each
    query block over the key blocks, with an online softmax: the float32 output and the
    log-sum-exp [B, K, G, T, 1]. A (query, key) block pair with no visible pair is skipped
    (`lax.cond`), which is where causality halves the work. Loops, not unrolled blocks: the
    program's size does not grow with T. A query that sees no key gets output 0 and a very
    negative log-sum-exp (so partial results over key subsets merge). `start`: the (output,
    log-sum-exp) over keys already seen (a ring step), which the online softmax goes on from
    in place of a separate merge: one float32 output buffer instead of three."""
    b, kh, g, t, h = q.shape
    s_len = k.shape[2]
    bq, bk = _divisor_at_most(t, block), _divisor_at_most(s_len, block)

    def query_block(i: Array) -> tuple[Array, Array]:
        qb, qp, qs = (_slice(q, i * bq, bq, 3), _slice(q_pos, i * bq, bq, 1),
                      _slice(q_seg, i * bq, bq, 1))

        def key_block(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            kp, ks = _slice(k_pos, j * bk, bk, 1), _slice(k_seg, j * bk, bk, 1)

            def attend(c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                m, l_, acc = c
                kb, vb = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
                shown, scores = _pair_scores(qb, kb, qp, kp, qs, ks)
                scores = jnp.where(shown, scores, NEG)
                m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
                p = jnp.where(shown, jnp.exp(scores - m_new), 0.0)
                corr = jnp.exp(m - m_new)
                acc = acc * corr + jnp.einsum("bkgts,bksh->bkgth", p.astype(vb.dtype), vb,
                                              preferred_element_type=F32)
                return m_new, l_ * corr + jnp.sum(p, axis=-1, keepdims=True), acc

            return jax.lax.cond(_may_see(qp, kp, qs, ks), attend, lambda c: c, carry)

        if start is None:
            init = (jnp.full((b, kh, g, bq, 1), NEG, F32), jnp.zeros((b, kh, g, bq, 1), F32),
                    jnp.zeros((b, kh, g, bq, h), F32))
        else:  # out = acc / l and lse = m + log l, taken with l = 1
            init = (_slice(start[1], i * bq, bq, 3), jnp.ones((b, kh, g, bq, 1), F32),
                    _slice(start[0], i * bq, bq, 3))
        m, l_, acc = jax.lax.fori_loop(0, s_len // bk, key_block, init)
        safe = jnp.maximum(l_, jnp.finfo(F32).tiny)
        return acc / safe, m + jnp.log(safe)

    outs, lses = jax.lax.map(query_block, jnp.arange(t // bq))
    return (jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, t, h),
            jnp.moveaxis(lses, 0, 3).reshape(b, kh, g, t, 1))


def _flash_backward(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                   q_seg: Array | None, k_seg: Array | None, out: Array, lse: Array,
                   d_out: Array, block: int, start: tuple[Array, Array, Array] | None = None
                   ) -> tuple[Array, Array, Array]:
    """Gradients of `flash_forward` for Q, K, V (float32), recomputing each block pair's
    probabilities from the log-sum-exp (FlashAttention-2's backward: key blocks outside,
    query blocks inside, dQ accumulated in place). `out` and `lse` may be the final ones over
    more keys than these (a ring step): the partial gradients then simply add, onto `start`
    (float32 dQ, dK, dV so far) when given."""
    b, kh, g, t, h = q.shape
    s_len = k.shape[2]
    bq, bk = _divisor_at_most(t, block), _divisor_at_most(s_len, block)
    cd = q.dtype
    row = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1, keepdims=True)

    def key_block(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        kb, vb = _slice(k, j * bk, bk, 2), _slice(v, j * bk, bk, 2)
        kp, ks = _slice(k_pos, j * bk, bk, 1), _slice(k_seg, j * bk, bk, 1)

        def query_block(i: Array, c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            qp, qs = _slice(q_pos, i * bq, bq, 1), _slice(q_seg, i * bq, bq, 1)

            def grads(c: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                dq, dk_j, dv_j = c
                qb, dob = _slice(q, i * bq, bq, 3), _slice(d_out, i * bq, bq, 3)
                shown, scores = _pair_scores(qb, kb, qp, kp, qs, ks)
                p = jnp.where(shown, jnp.exp(scores - _slice(lse, i * bq, bq, 3)), 0.0)
                dp = jnp.einsum("bkgth,bksh->bkgts", dob, vb, preferred_element_type=F32)
                ds = (p * (dp - _slice(row, i * bq, bq, 3))).astype(cd)
                dq_i = jnp.einsum("bkgts,bksh->bkgth", ds, kb, preferred_element_type=F32)
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, _slice(dq, i * bq, bq, 3) + dq_i, i * bq, axis=3)
                dk_j = dk_j + jnp.einsum("bkgts,bkgth->bksh", ds, qb, preferred_element_type=F32)
                dv_j = dv_j + jnp.einsum("bkgts,bkgth->bksh", p.astype(cd), dob,
                                         preferred_element_type=F32)
                return dq, dk_j, dv_j

            return jax.lax.cond(_may_see(qp, kp, qs, ks), grads, lambda c: c, c)

        dq, dk, dv = carry
        dq, dk_j, dv_j = jax.lax.fori_loop(0, t // bq, query_block,
                                           (dq, _slice(dk, j * bk, bk, 2),
                                            _slice(dv, j * bk, bk, 2)))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, axis=2),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, axis=2))

    if start is None:
        start = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    return jax.lax.fori_loop(0, s_len // bk, key_block, start)


# Both passes run as opaque units (`jax.checkpoint` saving nothing): inside a scanned layer
# loop, JAX's partial evaluation would otherwise split their loops and hoist every
# loop-invariant intermediate (block masks, scores) out of the layer loop for all block pairs
# at once: [T/block, S/block, B, heads, block, block] buffers, hundreds of GiB at 32k tokens.
flash_forward = jax.checkpoint(_flash_forward, static_argnums=(7,),
                               policy=jax.checkpoint_policies.nothing_saveable)
flash_backward = jax.checkpoint(_flash_backward, static_argnums=(10,),
                                policy=jax.checkpoint_policies.nothing_saveable)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def flash_attention(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array,
                    q_seg: Array | None, k_seg: Array | None, block: int) -> Array:
    """`flash_forward`'s output in Q's dtype, with `flash_backward` as its gradient: memory
    O(T x block) in both passes, never T x T."""
    return flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, block)[0].astype(q.dtype)


def _flash_fwd(q: Array, k: Array, v: Array, q_pos: Array, k_pos: Array, q_seg: Array | None,
               k_seg: Array | None, block: int) -> tuple[Array, tuple[Array | None, ...]]:
    out, lse = flash_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, block)
    out, lse = _named_for_remat(out.astype(q.dtype), lse)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(block: int, res: tuple[Array | None, ...], d_out: Array
               ) -> tuple[Array | None, ...]:
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
    dq, dk, dv = flash_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, d_out, block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)


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
                             segment_ids_BxT: Array | None, scale: float, block: int,
                             positions_BxT: Array | None = None) -> Array:
    """Causal self-attention in blocks of `block` queries and keys (`flash_attention`).

    Why: the one-einsum form computes, masks, normalises and stores all T x T scores although
    causality throws half of them away; the scores and their gradient are the layer's
    largest tensors, and at long context they do not fit. Block pairs above the diagonal
    (or across documents) are skipped; memory is O(T x block). Plain XLA ops, so it runs,
    shards and differentiates wherever the one-einsum form does. `positions` (within each
    document) default to 0..T-1.
    """
    q, k, v = to_head_major(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(q_BxTxNxH.shape[1]),
                                         q_BxTxNxH.shape[:2])
    return from_head_major(flash_attention(q, k, v, positions_BxT, positions_BxT,
                                           segment_ids_BxT, segment_ids_BxT, block))


def segment_runs(segment_ids_BxT: Array) -> Array:
    """Each token's run of equal segment ids in its row, counted from 0: the last token's
    is one less than the row's documents (a padding run counted as one)."""
    first = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                             segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    return jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1


def segment_layout(segment_ids_BxT: Array, max_segments: int) -> tuple[Array, Array, Array]:
    """A packed batch's documents as cuDNN's packed layout takes them: each run of equal
    segment ids is one sequence (a padding run too, so that every token belongs to one and
    no output is left unwritten): the runs' lengths [B, M] and first tokens [B, M + 1], both
    -1 past a row's last run; and whether every row holds at most M = `max_segments` runs.

    Runs, not ids: within a run the `visible` rule (same id, key not after the query by
    position) and the kernel's per-sequence causal mask agree, because positions restart at
    every run (data/batch.py's `model_row`). Built by comparisons and reductions along each
    row only, so it stays split wherever the batch is."""
    b = segment_ids_BxT.shape[0]
    run_BxT = segment_runs(segment_ids_BxT)
    in_run_BxMxT = run_BxT[:, None, :] == jnp.arange(max_segments, dtype=jnp.int32)[None, :, None]
    lengths_BxM = jnp.sum(in_run_BxMxT, axis=2, dtype=jnp.int32)
    starts_BxM = jnp.argmax(in_run_BxMxT, axis=2).astype(jnp.int32)
    present = lengths_BxM > 0
    none = jnp.full((b, 1), -1, jnp.int32)
    return (jnp.where(present, lengths_BxM, -1),
            jnp.concatenate([jnp.where(present, starts_BxM, -1), none], axis=1),
            jnp.all(run_BxT[:, -1] < max_segments))


def cudnn_takes_packed_rows() -> bool:
    """Whether this process's cuDNN runs the packed layout: a Hopper or later GPU (JAX's
    cuDNN module refuses the layout below) and cuDNN 9.6 or later (the floor of JAX's own
    packed-layout test). Elsewhere packed rows take our blocks, as before the layout was
    used; `attention` says so once."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    try:
        return fused.check_cudnn_version() >= 90600 and fused.check_compute_capability("9.0")
    except RuntimeError:  # no cuDNN in this jaxlib
        return False


@functools.cache
def _say_packed_rows_take_the_blocks() -> None:
    print("note: model.attention=cudnn: packed rows take the xla attention blocks here "
          "(cuDNN's packed layout needs a Hopper or later GPU and cuDNN 9.6+)", file=sys.stderr)


@functools.cache
def packed_kv_offsets_follow_query_heads() -> bool:
    """Whether this JAX's cuDNN module strides packed K/V offsets by the *query's* heads x
    head size (`_fix_seqlen_offsets` in jax 0.10; 0.11 strides them by K/V's own heads).
    With grouped K/V (fewer heads than the query) such offsets point past their documents,
    so `cudnn_packed_attention` repeats K/V to the query's heads where this holds.

    Asked of that function itself, on one K/V head for two query heads, so the answer
    follows the installed JAX rather than its version number; a JAX without that function
    gets the repeat, which is right under either stride."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    try:
        with jax.ensure_compile_time_eval():
            lengths = jnp.array([[1, 1]], jnp.int32)
            starts = jnp.array([[0, 1, -1]], jnp.int32)
            *_, kv_offsets = fused._fix_seqlen_offsets(
                lengths, lengths, starts, starts, jnp.zeros((1, 2, 2, 1)),
                jnp.zeros((1, 2, 1, 1)))
            return int(kv_offsets[0, 1]) != 1  # K/V's second token: one head of size 1
    except (AttributeError, TypeError, ValueError):
        return True


def cudnn_packed_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array,
                           lengths_BxM: Array, starts_BxMp1: Array, scale: float,
                           repeat_kv: bool | None = None) -> Array:
    """cuDNN's flash attention over packed rows: each row's sequences (`segment_layout`)
    attend causally within themselves, with no [T, T] mask anywhere.

    JAX's public `dot_product_attention` takes only one sequence length per row, so this is
    its cuDNN module's own entry point, the one `jax.nn.dot_product_attention` itself calls
    (MaxText's cuDNN path uses it too); `tests/test_packed_attention.py` lowers it for CUDA on
    CPU, so a change in its arguments shows in CI, not on a GPU.

    Grouped K/V heads are repeated to the query's (`repeat_kv`; None: where this JAX needs
    it, `packed_kv_offsets_follow_query_heads`). `scripts/gpu_checks.py` reports cuDNN's
    error with and without the repeat."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    if repeat_kv is None:
        repeat_kv = packed_kv_offsets_follow_query_heads()
    groups = q_BxTxNxH.shape[2] // k_BxTxKxH.shape[2]
    if repeat_kv and groups > 1:
        k_BxTxKxH, v_BxTxKxH = (jnp.repeat(x, groups, axis=2) for x in (k_BxTxKxH, v_BxTxKxH))
    return dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, q_seqlen=lengths_BxM, kv_seqlen=lengths_BxM,
        q_offsets=starts_BxMp1, kv_offsets=starts_BxMp1, scale=scale,
        mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def packed_fused_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array,
                           segment_ids_BxT: Array, scale: float, max_segments: int,
                           block: int) -> Array:
    """Packed rows through cuDNN when every row of the batch holds at most `max_segments`
    runs (`segment_layout`), else through our causal blocks: the same result either way,
    chosen on the device for each batch (`lax.cond`), so no batch can be attended wrongly
    whatever its documents. The layout's stats are [B x M, heads, T] floats, hence a bound."""
    lengths, starts, fits = segment_layout(segment_ids_BxT, max_segments)

    def fused(q: Array, k: Array, v: Array) -> Array:
        return cudnn_packed_attention(q, k, v, lengths, starts, scale)

    def blocks(q: Array, k: Array, v: Array) -> Array:
        return _recomputed_causal_attention(q, k, v, segment_ids_BxT, scale, block)

    return jax.lax.cond(fits, fused, blocks, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _recomputed_causal_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array,
                                 segment_ids_BxT: Array, scale: float, block: int) -> Array:
    """Our causal blocks keeping only their inputs for the backward, which runs their forward
    again. Why: a `lax.cond`'s residuals are the union of its branches' (JAX fills each
    branch's missing ones with zeros), so as `packed_fused_attention`'s fallback the blocks'
    saved output and log-sum-exp would be kept in every step beside cuDNN's, for a branch
    that runs rarely (measured: `docs/performance.md`)."""
    return _xla_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, scale, block)


def _recomputed_fwd(q: Array, k: Array, v: Array, seg: Array, scale: float, block: int
                    ) -> tuple[Array, tuple[Array, ...]]:
    return _recomputed_causal_attention(q, k, v, seg, scale, block), (q, k, v, seg)


def _recomputed_bwd(scale: float, block: int, residuals: tuple[Array, ...], d_out: Array
                    ) -> tuple[Array | None, ...]:
    q, k, v, seg = residuals
    pullback = jax.vjp(lambda *qkv: _xla_causal_attention(*qkv, seg, scale, block), q, k, v)[1]
    return (*pullback(d_out), None)


_recomputed_causal_attention.defvjp(_recomputed_fwd, _recomputed_bwd)


def _xla_causal_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                          segment_ids_BxT: Array | None, scale: float, block: int) -> Array:
    t = q_BxTxNxH.shape[1]
    if 0 < block < t and t == k_BxSxKxH.shape[1]:
        return blocked_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                                        scale, block)
    mask = attention_mask(segment_ids_BxT, t, k_BxSxKxH.shape[1])
    return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale)


def attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
              segment_ids_BxT: Array | None, *, impl: str, scale: float,
              mask_BxTxS: Array | None = None, block: int = 0,
              max_segments: int = 0) -> Array:
    """Causal attention within documents (`segment_ids`; None: one document per row), or under
    an explicit `mask` (decoding over a cache), on a sequence held whole by each device.
    `impl`: "xla" (our kernels: query blocks of `block` rows when that splits the sequence,
    else one masked einsum), or a fused kernel through `jax.nn.dot_product_attention`
    ("cudnn", or "dot_product_attention" for JAX's choice). Packed rows reach cuDNN as
    sequence lengths and offsets (`packed_fused_attention`) when `max_segments` allows;
    otherwise, and for JAX's choice (its public API takes document boundaries only as a
    dense [B, 1, T, T] mask), they take the query blocks."""
    if mask_BxTxS is not None:
        return xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale)
    if impl == "cudnn" and segment_ids_BxT is not None and max_segments > 1:
        if cudnn_takes_packed_rows():
            return packed_fused_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                                          scale, max_segments, block)
        _say_packed_rows_take_the_blocks()
    if impl == "xla" or segment_ids_BxT is not None:
        return _xla_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale,
                                     block)
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
