"""Cross-entropy of next-token prediction: from logits, or fused with the LM head.

Both return sums (not means) over weighted tokens, so microbatches and data shards combine
exactly; the caller divides by the token count once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax.fp8 import Scaled
from llama_jax.ops import HEAD_IN_COMPUTE_DTYPE, HeadProduct
from llama_jax.sharding import constrain

Array = jax.Array
F32 = jnp.float32


def _online_combine(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
    """Two partial (max m, sum of exp(x - m)) pairs as one. Where a side's max is the
    joint max its sum is taken as it is: two empty sides (-inf, 0) stay (-inf, 0) rather
    than exp(-inf - -inf) = NaN; a NaN anywhere stays NaN."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    return m, (jnp.where(m1 == m, s1, s1 * jnp.exp(m1 - m))
               + jnp.where(m2 == m, s2, s2 * jnp.exp(m2 - m)))


def _logsumexp_one_pass(x: Array) -> Array:
    """log sum exp over the last axis as one reduction of (max, rescaled sum) pairs: one read
    of x (the online softmax's normaliser)."""
    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.array(-jnp.inf, x.dtype),
                                                  jnp.array(0, x.dtype)),
                          _online_combine, (x.ndim - 1,))
    return m + jnp.log(s)


def _logsumexp_two_pass(x: Array) -> Array:
    return jax.nn.logsumexp(x, axis=-1)


@jax.custom_vjp
def logsumexp(x: Array) -> Array:
    """log sum exp over the last axis: in one pass over `x` on a GPU, in two elsewhere.

    Why: the loss reads the float32 logits, the largest tensor of a 128k-vocabulary step,
    once for their max and once more for the sum of exponentials (1.05 GB each per slice of
    the 1B's sliced head: 3.9 ms of its step on an H200). XLA:GPU emits the paired
    reduction as one fused row reduction; XLA:CPU runs its combiner per element, scalar,
    9-14x slower than the two vectorised passes, so other platforms keep those. Gradient:
    softmax(x) times the output's."""
    return jax.lax.platform_dependent(x, cuda=_logsumexp_one_pass, rocm=_logsumexp_one_pass,
                                      default=_logsumexp_two_pass)


def _logsumexp_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    out = logsumexp(x)
    return out, (x, out)


def _logsumexp_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, out = residuals
    return (g[..., None] * jnp.exp(x - out[..., None]),)


logsumexp.defvjp(_logsumexp_fwd, _logsumexp_bwd)


def _sums(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array, z_loss: float
          ) -> tuple[Array, Array, Array]:
    """(loss total with z-loss, cross-entropy sum, log-partition per token), in float32
    whatever the logits' dtype (the upcast fuses into the reductions' reads)."""
    logits_BxTxV = logits_BxTxV.astype(F32)
    log_z = logsumexp(logits_BxTxV)
    target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    ce = ((log_z - target_logit) * weights_BxT).sum()
    total = ce + z_loss * (jnp.square(log_z) * weights_BxT).sum() if z_loss else ce
    return total, ce, log_z


def loss_sums(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array,
              z_loss: float) -> tuple[Array, dict[str, Array]]:
    """Summed fp32 cross-entropy over weighted tokens, plus optional z-loss, from logits."""
    total, ce, _ = _sums(logits_BxTxV, targets_BxT, weights_BxT, z_loss)
    return total, {"ce_sum": ce, "tokens": weights_BxT.sum()}


def head_loss_sums(x_BxTxD: Array, w_DxV: Array, targets_BxT: Array, weights_BxT: Array,
                   z_loss: float, product: HeadProduct = HEAD_IN_COMPUTE_DTYPE
                   ) -> tuple[Array, dict[str, Array]]:
    """`loss_sums(x @ w)`, the LM head and the loss as one custom VJP.

    Why: autodiff of the pair makes several passes over the float32 [B, T, V] logits in the
    backward (the softmax, the target's one-hot, the z-loss term, each an f32 tensor, then a
    cast to the compute dtype for the head's gradient products), the largest tensors of a
    128k-vocabulary model (16.8 GB at batch 16 x 2048). Here the backward makes one: the
    logits gradient `w * ((1 + 2 z log_z) p - onehot)` is formed and written in the compute
    dtype in one fused loop, then the two products run as `product` says (`ops.head_matmul`'s).
    Same numbers as autodiff up to float rounding (tests/test_fast_paths.py).
    """
    total, ce = _head_loss(x_BxTxD, w_DxV, targets_BxT, weights_BxT, z_loss, product)
    return total, {"ce_sum": ce, "tokens": weights_BxT.sum()}


def _logits(x_BxTxD: Any, w_DxV: Any, product: HeadProduct) -> Array:
    """Logits (in `product.logits_dtype`) of operands from `product.operand`."""
    return constrain(product.logits(x_BxTxD, w_DxV), ("batch", "length", "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_loss(x: Array, w: Array, targets: Array, weights: Array, z_loss: float,
               product: HeadProduct) -> tuple[Array, Array]:
    return _head_loss_fwd(x, w, targets, weights, z_loss, product)[0]


def _head_loss_fwd(x: Array, w: Array, targets: Array, weights: Array, z_loss: float,
                   product: HeadProduct) -> tuple[tuple[Array, Array], tuple[Any, ...]]:
    x_op, w_op = product.operand(x), product.operand(w)
    logits = _logits(x_op, w_op, product)
    total, ce, log_z = _sums(logits, targets, weights, z_loss)
    return (total, ce), (x_op, w_op, logits, log_z, targets, weights)


def _head_loss_bwd(z_loss: float, product: HeadProduct, residuals: tuple[Any, ...],
                   cotangents: tuple[Array, Array]) -> tuple[Array, Array, None, None]:
    x, w, logits, log_z, targets, weights = residuals
    d_total, d_ce = cotangents
    # d total / d logits = w (1 + 2 z log_z) p - w onehot; d ce / d logits = w (p - onehot).
    p_scale = weights * (d_total * (1.0 + 2.0 * z_loss * log_z) + d_ce)
    onehot_scale = weights * (d_total + d_ce)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    probs = jnp.exp(logits.astype(F32) - log_z[..., None])
    d_logits = (p_scale[..., None] * probs
                - jnp.where(vocab == targets[..., None], onehot_scale[..., None], 0.0))
    d_logits = constrain(d_logits.astype(x.dtype), ("batch", "length", "vocab"))
    dx, dw = product.gradients(x, w, d_logits)
    return dx, dw, None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def chunked_head_loss_sums(x_BxTxD: Array, w_DxV: Array, targets_BxT: Array,
                           weights_BxT: Array, z_loss: float, chunks: int,
                           product: HeadProduct = HEAD_IN_COMPUTE_DTYPE
                           ) -> tuple[Array, dict[str, Array]]:
    """`head_loss_sums` over `chunks` slices of the positions, so at most one slice's float32
    logits [B, T/chunks, V] exist at a time, in the forward and in the backward.

    Why: the fused head keeps the whole [B, T, V] float32 logits for its backward, the largest
    buffer of a long-context or 128k-vocabulary step. Here each slice's logits gradient is
    formed and used during the forward (the loss is the graph's last node, so its gradient
    needs nothing that comes later): the head's input and weight gradients are kept instead
    (the size of x and of w), and the backward only scales them. No logits are recomputed,
    so the FLOPs equal the fused path's. Slice c holds positions c, c + chunks, ...: strided
    rather than contiguous, so a sequence split over devices stays split in every slice.
    In fp8 (`product`) the input and the weight are quantised once, each slice's logits
    gradient by its own amax.
    """
    total, ce = _chunked_head_loss(x_BxTxD, w_DxV, targets_BxT, weights_BxT, z_loss, chunks,
                                   product)
    return total, {"ce_sum": ce, "tokens": weights_BxT.sum()}


CHUNK_LOGITS_BYTES = 1 << 30  # model.loss_chunks=0: one slice's logits per device


def auto_chunks(seq_len: int, tokens_per_device: float, vocab_per_device: float,
                sequence_shards: int = 1, logits_bytes: int = 4) -> int:
    """The fewest slices (dividing `seq_len`, each still split over the sequence shards) that
    keep one slice's logits per device (`logits_bytes` each: model.logits_dtype's) under
    CHUNK_LOGITS_BYTES; the most there can be when none does. Fewer slices, fewer passes
    over the head's float32 weight-gradient sum, which each slice's GEMM reads and writes
    (1 GB for the 1B's [2048, 128256]): bf16 logits take half as many."""
    admissible = [n for n in range(1, seq_len + 1)
                  if seq_len % n == 0 and (n == 1 or (seq_len // n) % sequence_shards == 0)]
    for n in admissible:
        if tokens_per_device * vocab_per_device * logits_bytes / n <= CHUNK_LOGITS_BYTES:
            return n
    return admissible[-1]


def _strided(a: Array, chunks: int) -> Array:
    """[B, T, ...] -> [chunks, B, T/chunks, ...]: slice c holds positions c::chunks."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // chunks, chunks, *a.shape[2:]), 2, 0)


def _unstrided(a: Array) -> Array:
    chunks, b, tc = a.shape[:3]
    return jnp.moveaxis(a, 0, 2).reshape(b, tc * chunks, *a.shape[3:])


def _chunk_grads(x: Array, w: Array, targets: Array, weights: Array, z_loss: float,
                 chunks: int, product: HeadProduct, with_grads: bool) -> tuple[Array, ...]:
    """Sums over the slices; with `with_grads` also d total and d ce with respect to x and w
    (one pair when z_loss is 0, where the two are equal)."""
    pairs = 2 if z_loss else 1
    w_op, x_op = product.operand(w), product.operand(x)
    # An fp8 input is quantised whole, so its slices share one scale: the logits, and so
    # the loss, do not depend on the number of slices.
    x_values = x_op.values if isinstance(x_op, Scaled) else x_op

    def one(carry: tuple[Array, ...], xs: tuple[Array, Array, Array]
            ) -> tuple[tuple[Array, ...], Array | None]:
        x_c, t_c, wt_c = xs
        x_c = x_op.replace(values=x_c) if isinstance(x_op, Scaled) else x_c
        logits = _logits(x_c, w_op, product)
        total, ce, log_z = _sums(logits, t_c, wt_c, z_loss)
        sums = (carry[0] + total, carry[1] + ce)
        if not with_grads:
            return (*sums, *carry[2:]), None
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        probs = jnp.exp(logits.astype(F32) - log_z[..., None])
        onehot = vocab == t_c[..., None]
        dws, dxs = [], []
        for kind in range(pairs):  # 0: d total (with z-loss), 1: d ce
            p_scale = wt_c * (1.0 + 2.0 * z_loss * log_z) if kind == 0 else wt_c
            d_logits = p_scale[..., None] * probs - jnp.where(onehot, wt_c[..., None], 0.0)
            d_logits = constrain(d_logits.astype(x.dtype), ("batch", "length", "vocab"))
            # A float32 weight gradient added to the running sum: XLA:GPU makes the sum
            # the GEMM's own accumulation (cuBLAS beta = 1, or the Triton GEMM's epilogue)
            # instead of a pass over the [D, V] float32 sum per slice.
            dx_c, dw_c = product.gradients(x_c, w_op, d_logits, F32)
            dxs.append(dx_c)
            dws.append(carry[2 + kind] + dw_c)
        return (*sums, *dws), jnp.stack(dxs)

    zero = jnp.zeros((), F32)
    dw0 = (jnp.zeros(w.shape, F32),) * pairs if with_grads else ()
    carry, dx = jax.lax.scan(one, (zero, zero, *dw0),
                             (_strided(x_values, chunks), _strided(targets, chunks),
                              _strided(weights, chunks)))
    if not with_grads:
        return carry[0], carry[1]
    dxs = tuple(_unstrided(dx[:, kind]) for kind in range(pairs))
    dws = tuple(dw.astype(w.dtype) for dw in carry[2:])
    return carry[0], carry[1], *dxs, *dws


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_head_loss(x: Array, w: Array, targets: Array, weights: Array, z_loss: float,
                       chunks: int, product: HeadProduct) -> tuple[Array, Array]:
    return _chunk_grads(x, w, targets, weights, z_loss, chunks, product, with_grads=False)


def _chunked_head_loss_fwd(x: Array, w: Array, targets: Array, weights: Array, z_loss: float,
                           chunks: int, product: HeadProduct
                           ) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
    total, ce, *grads = _chunk_grads(x, w, targets, weights, z_loss, chunks, product,
                                     with_grads=True)
    return (total, ce), tuple(grads)


def _chunked_head_loss_bwd(z_loss: float, chunks: int, product: HeadProduct,
                           grads: tuple[Array, ...],
                           cotangents: tuple[Array, Array]) -> tuple[Array, Array, None, None]:
    """The gradients were formed in the forward for cotangent 1; scale and add them."""
    d_total, d_ce = cotangents
    if z_loss:
        dx_total, dx_ce, dw_total, dw_ce = grads
        parts = ((d_total, dx_total, dw_total), (d_ce, dx_ce, dw_ce))
    else:
        dx_both, dw_both = grads
        parts = ((d_total + d_ce, dx_both, dw_both),)
    dx = sum(scale * g_x.astype(F32) for scale, g_x, _ in parts)
    dw = sum(scale * g_w.astype(F32) for scale, _, g_w in parts)
    return dx.astype(grads[0].dtype), dw.astype(grads[-1].dtype), None, None


_chunked_head_loss.defvjp(_chunked_head_loss_fwd, _chunked_head_loss_bwd)
