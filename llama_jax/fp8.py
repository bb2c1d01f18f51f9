"""fp8 matmuls, scaled per tensor by current ("dynamic") or delayed scaling.

Each operand is scaled so that its largest element lands on the fp8 format's largest finite
value: activations and weights in E4M3 (more mantissa); output gradients in E4M3 too by
default, or in E5M2 (more range). The products run on fp8 operands with a wider output
(`lax.dot_general` on fp8 types, which XLA:GPU maps to cuBLASLt fp8 GEMMs on Hopper and
XLA:CPU emulates exactly by upcasting), and the result is multiplied by the two scales. The
weight gradient's product can stay in the compute dtype instead.

Two ways to choose the scale (`model.fp8_scaling`):
- **current** (default): from the operand's own amax, measured in the same step, as
  torchtitan's float8 training does. No state; but the cast to fp8 has to wait for a
  reduction over the whole operand, so the operand is read twice and cannot be cast inside
  the kernel that produces it. With it, E4M3 gradients end 0.37% above bf16's loss after 200
  steps of the default run, E5M2 2.1% (docs/performance.md).
- **delayed**: from the largest amax of the last `model.fp8_amax_history` steps (Transformer
  Engine's and Flax's `Fp8DotGeneralOp` recipe; TE's default history is 1024, torchao's 16).
  The cast depends only on a number known before the step, so it can fuse into the producer
  (the norm, the activation, the previous GEMM's epilogue), and the amax is a side output of
  the same pass. The histories are part of the train state (checkpointed, so a resumed run
  is the uninterrupted one exactly). A value beyond the stale scale's range is clipped to the
  format's largest finite value, as TE does.

How the observed amaxes get out of the step: the scales enter each matmul as an input of its
custom VJP, and the backward returns the three amaxes (input, weight, output gradient) as
that input's "gradient". Differentiating the loss for the scales therefore yields every
amax of the step, including the output gradients' that only the backward sees (Flax's
overwrite-with-gradient trick, made explicit: the step records them in the history rather
than handing them to the optimizer). The quantise/dequantise helpers and the scale rule are
Flax's (`flax.linen.fp8_ops`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import fp8_ops

Array = jax.Array
PyTree = Any
F32 = jnp.float32
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
GRADIENT_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
# The three operands whose amaxes a matmul observes, in this order along a history's last axis.
OPERANDS = ("input", "weight", "output_gradient")


@flax.struct.dataclass
class Fp8Weight:
    """A projection's weight with the scales its matmul quantises by (f32[3], `OPERANDS`).

    With `current` the scales are ignored and each operand is scaled by its own amax (the
    first step of a run, which has no history yet); the amaxes are observed either way."""

    w: Array
    scales: Array
    current: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class LayerScales:
    """The scales of a block's projections, {sub-module: {projection: f32[..., 3]}}, with a
    leading layer dimension for the whole stack and without it for one block."""

    values: dict[str, dict[str, Array]]
    current: bool = flax.struct.field(pytree_node=False, default=False)

    def of(self, module: str) -> LayerScales:
        return LayerScales(self.values[module], self.current)

    def weight(self, name: str, w: Array) -> Fp8Weight:
        return Fp8Weight(w, self.values[name], self.current)


def operand(scales: LayerScales | None, name: str, w: Array) -> Array | Fp8Weight:
    """What a block passes its matmul for projection `name`: the weight alone (current
    scaling, or no fp8), or the weight with its delayed scales."""
    return w if scales is None else scales.weight(name, w)


@flax.struct.dataclass
class Scaled:
    """An operand in fp8 with the float32 scale that multiplies it back, and the dtype it had
    (that of its gradient)."""

    values: Array
    scale: Array
    dtype: Any = flax.struct.field(pytree_node=False)


def current_scale(amax: Array, fp8_dtype: jnp.dtype) -> Array:
    """The scale that puts `amax` on the format's largest finite value (1 for all zeros)."""
    return jnp.where(amax > 0, amax / fp8_ops.get_fp8_max(fp8_dtype, F32), 1.0)


def quantized(x: Array, fp8_dtype: jnp.dtype, scale: Array | None = None
              ) -> tuple[Scaled, Array]:
    """x in `fp8_dtype`, divided by `scale` (clipped to the format's range), or when `scale`
    is None by x's own amax over the format's largest finite value; and x's amax."""
    amax = jnp.max(jnp.abs(x)).astype(F32)
    if scale is None:
        scale = current_scale(amax, fp8_dtype)
    # Divided in float32 (inside the fused cast on a GPU): in bf16 the quotient would be
    # rounded twice, to bf16 and then to fp8.
    values = fp8_ops.quantize(x.astype(F32), fp8_dtype, scale, F32)
    return Scaled(values, scale, x.dtype), amax


def scaled_dot(a: Scaled, b: Scaled, contract: tuple[tuple[int, ...], tuple[int, ...]],
               out_dtype: jnp.dtype) -> Array:
    """The product of two quantised operands over the `contract` axes, scaled back.

    The unscaled product (operands up to 448 each, summed over the contraction) overflows
    float16 long before it is scaled back, so a dtype with less exponent range than float32
    gets a float32 product, scaled there and then cast. bfloat16 has float32's range: its
    product stays bfloat16, the form XLA:GPU turns into one cuBLASLt fp8 GEMM with the scale
    in its epilogue (measured on the H200)."""
    narrow = jnp.finfo(out_dtype).maxexp < jnp.finfo(F32).maxexp
    y = jax.lax.dot_general(a.values, b.values, (contract, ((), ())),
                            preferred_element_type=F32 if narrow else out_dtype)
    if narrow:
        return (y * (a.scale * b.scale)).astype(out_dtype)
    return fp8_ops.dequantize(y, out_dtype, a.scale * b.scale)


def gradient_products(x: Scaled, w: Scaled, g: Scaled, dy: Array, wgrad_fp8: bool,
                      weight_dtype: jnp.dtype | None = None, reduce_in_f32: bool = False
                      ) -> tuple[Array, Array]:
    """The input and weight gradients of `x @ w` (x [..., D], w [D, F]) from the quantised
    operands and output gradient `g` (`dy` quantised), in the operands' own dtypes (the
    weight's in `weight_dtype` if given); the weight gradient's product in `dy`'s dtype, on
    fp8-rounded activations, unless `wgrad_fp8`. Contracting every leading axis in place (not
    merged into one) keeps a batch and a length split over different mesh axes split (as
    `ops.dense_bwd` does). `reduce_in_f32`: the weight gradient's product in float32, cast
    after, so that XLA sums it across devices in float32 (`ops.dense_bwd`)."""
    lead = tuple(range(dy.ndim - 1))
    out = weight_dtype or w.dtype
    product = F32 if reduce_in_f32 else out
    dx = scaled_dot(g, w, ((dy.ndim - 1,), (1,)), x.dtype)
    if wgrad_fp8:
        return dx, scaled_dot(x, g, (lead, lead), product).astype(out)
    x_rounded = fp8_ops.dequantize(x.values, dy.dtype, x.scale)
    return dx, jax.lax.dot_general(x_rounded, dy, ((lead, lead), ((), ())),
                                   preferred_element_type=product).astype(out)


@functools.cache
def fp8_matmul(gradients: str = "e4m3", weight_gradient: str = "fp8",
               reduce_in_f32: bool = False) -> Callable[[Array, Array | Fp8Weight], Array]:
    """`x @ w` over the last axis of x (w 2-D) in fp8, output in x's dtype: the forward and
    the input gradient always, the weight gradient unless `weight_gradient="bf16"` (then the
    output gradient is not rounded where it meets the activations, torchtitan's
    "rowwise_with_gw_hp" choice; the activations stay fp8-rounded). `w` alone is current
    scaling; an `Fp8Weight` brings delayed scales and receives the observed amaxes as its
    scales' gradient. `reduce_in_f32`: the weight gradient's product in float32
    (`gradient_products`). One function per setting, so that it can be a static argument of
    other custom VJPs."""
    grad_dtype = GRADIENT_FORMATS[gradients]
    wgrad_fp8 = {"fp8": True, "bf16": False}[weight_gradient]

    def matmul(x: Array, w: Array | Fp8Weight) -> Array:
        if isinstance(w, Fp8Weight):
            weight, scales, delayed = w.w, w.scales, not w.current
        else:  # nothing observes the amaxes: the scales are a dead input
            weight, scales, delayed = w, jnp.ones(len(OPERANDS), F32), False
        y = _fp8_matmul(x.reshape(-1, x.shape[-1]), weight.astype(x.dtype), scales,
                        grad_dtype, wgrad_fp8, delayed, reduce_in_f32)
        return y.reshape(*x.shape[:-1], weight.shape[-1])

    return matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_matmul(x_NxD: Array, w_DxF: Array, scales: Array, grad_dtype: jnp.dtype,
                wgrad_fp8: bool, delayed: bool, reduce_in_f32: bool) -> Array:
    return _fp8_matmul_fwd(x_NxD, w_DxF, scales, grad_dtype, wgrad_fp8, delayed,
                           reduce_in_f32)[0]


def _fp8_matmul_fwd(x: Array, w: Array, scales: Array, grad_dtype: jnp.dtype, wgrad_fp8: bool,
                    delayed: bool, reduce_in_f32: bool) -> tuple[Array, tuple[Any, ...]]:
    x8, ax = quantized(x, E4M3, scales[0] if delayed else None)
    w8, aw = quantized(w, E4M3, scales[1] if delayed else None)
    # The fp8 operands are what the backward needs: half the bytes of bf16 residuals.
    return scaled_dot(x8, w8, ((1,), (0,)), x.dtype), (x8, w8, ax, aw, scales)


def _fp8_matmul_bwd(grad_dtype: jnp.dtype, wgrad_fp8: bool, delayed: bool,
                    reduce_in_f32: bool, residuals: tuple[Any, ...], dy: Array
                    ) -> tuple[Array, Array, Array]:
    x, w, ax, aw, scales = residuals
    g8, ag = quantized(dy, grad_dtype, scales[2] if delayed else None)
    dx, dw = gradient_products(x, w, g8, dy, wgrad_fp8, reduce_in_f32=reduce_in_f32)
    # The scales' "gradient": what this step observed, for the history (see the module's doc).
    return dx, dw, jnp.stack([ax, aw, ag])


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# ---------------------------------------------------------------------------------------------
# Amax histories (delayed scaling)


def empty_history(projections: dict[str, tuple[str, ...]], layers: int, length: int
                  ) -> dict[str, dict[str, Array]]:
    """Zeros [layers, length, 3] per projection: no step observed yet (`is_empty`)."""
    return {module: {name: jnp.zeros((layers, length, len(OPERANDS)), F32) for name in names}
            for module, names in projections.items()}


def scales_from(history: PyTree, gradients: str, current: bool = False) -> LayerScales:
    """Each projection's scales [layers, 3] from the largest amax in its history (Flax's
    `compute_scale`: amax / format max, 1 where nothing was observed)."""
    fp8_max = jnp.asarray([fp8_ops.get_fp8_max(E4M3, F32), fp8_ops.get_fp8_max(E4M3, F32),
                           fp8_ops.get_fp8_max(GRADIENT_FORMATS[gradients], F32)])

    def scale(h: Array) -> Array:
        return fp8_ops.compute_scale(jnp.max(h, axis=-2), jnp.ones((), F32), fp8_max)

    return LayerScales(jax.tree.map(scale, history), current)


def recorded(history: PyTree, amaxes: PyTree) -> PyTree:
    """The histories with this step's amaxes ([layers, 3] each) as their newest entry (index
    0), the oldest dropped."""
    return jax.tree.map(lambda h, a: jnp.concatenate([a[:, None], h[:, :-1]], axis=1),
                        history, amaxes)


def is_empty(history: PyTree) -> bool:
    """Whether no step has been recorded (a fresh run, or one resumed from a checkpoint
    written without delayed scaling): the first step then scales by current amaxes. Read on
    the host from this process's own copy (the histories are replicated)."""
    return not any(np.asarray(h.addressable_shards[0].data).any()
                   for h in jax.tree.leaves(history))
