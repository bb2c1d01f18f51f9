"""Cross-entropy of next-token prediction: from logits, or fused with the LM head.

Both return sums (not means) over weighted tokens, so microbatches and data shards combine
exactly; the caller divides by the token count once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.ops import dense_bwd
from llama_jax.sharding import constrain

Array = jax.Array
F32 = jnp.float32


def _sums(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array, z_loss: float
          ) -> tuple[Array, Array, Array]:
    """(loss total with z-loss, cross-entropy sum, log-partition per token)."""
    log_z = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    ce = ((log_z - target_logit) * weights_BxT).sum()
    total = ce + z_loss * (jnp.square(log_z) * weights_BxT).sum() if z_loss else ce
    return total, ce, log_z


def loss_sums(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array,
              z_loss: float) -> tuple[Array, dict[str, Array]]:
    """Summed fp32 cross-entropy over weighted tokens, plus optional z-loss, from logits."""
    total, ce, _ = _sums(logits_BxTxV.astype(F32), targets_BxT, weights_BxT, z_loss)
    return total, {"ce_sum": ce, "tokens": weights_BxT.sum()}


def head_loss_sums(x_BxTxD: Array, w_DxV: Array, targets_BxT: Array, weights_BxT: Array,
                   z_loss: float) -> tuple[Array, dict[str, Array]]:
    """`loss_sums(x @ w)`, the LM head and the loss as one custom VJP.

    Why: autodiff of the pair makes several passes over the float32 [B, T, V] logits in the
    backward (the softmax, the target's one-hot, the z-loss term, each an f32 tensor, then a
    cast to the compute dtype for the head's gradient products), the largest tensors of a
    128k-vocabulary model (16.8 GB at batch 16 x 2048). Here the backward makes one: the
    logits gradient `w * ((1 + 2 z log_z) p - onehot)` is formed and written in the compute
    dtype in one fused loop, then the two products run as in `ops.dense`. Same numbers as
    autodiff up to float rounding (tests/test_model.py).
    """
    total, ce = _head_loss(x_BxTxD, w_DxV, targets_BxT, weights_BxT, z_loss)
    return total, {"ce_sum": ce, "tokens": weights_BxT.sum()}


def _logits(x_BxTxD: Array, w_DxV: Array) -> Array:
    logits = jnp.matmul(x_BxTxD, w_DxV, preferred_element_type=F32)
    return constrain(logits, ("batch", "length", "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_loss(x: Array, w: Array, targets: Array, weights: Array, z_loss: float
               ) -> tuple[Array, Array]:
    return _sums(_logits(x, w), targets, weights, z_loss)[:2]


def _head_loss_fwd(x: Array, w: Array, targets: Array, weights: Array, z_loss: float
                   ) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
    logits = _logits(x, w)
    total, ce, log_z = _sums(logits, targets, weights, z_loss)
    return (total, ce), (x, w, logits, log_z, targets, weights)


def _head_loss_bwd(z_loss: float, residuals: tuple[Array, ...], cotangents: tuple[Array, Array]
                   ) -> tuple[Array, Array, None, None]:
    x, w, logits, log_z, targets, weights = residuals
    d_total, d_ce = cotangents
    # d total / d logits = w (1 + 2 z log_z) p - w onehot; d ce / d logits = w (p - onehot).
    p_scale = weights * (d_total * (1.0 + 2.0 * z_loss * log_z) + d_ce)
    onehot_scale = weights * (d_total + d_ce)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    probs = jnp.exp(logits - log_z[..., None])
    d_logits = (p_scale[..., None] * probs
                - jnp.where(vocab == targets[..., None], onehot_scale[..., None], 0.0))
    d_logits = constrain(d_logits.astype(x.dtype), ("batch", "length", "vocab"))
    dx, dw = dense_bwd((x, w), d_logits)
    return dx, dw, None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
