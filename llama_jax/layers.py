"""Building blocks of a decoder: norms, rotary embeddings, attention and MLP.

Tensor names carry their shape: B batch, T query length, S key length, D hidden, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, F mlp width, V vocabulary.
Every parameter records its logical axis names in the `logical_axes` metadata; `sharding.py`
alone maps those names to a mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llama_jax import context_parallel
from llama_jax.config import ModelConfig
from llama_jax.fp8 import LayerScales, operand
from llama_jax.ops import (
    ATTENTION_K,
    ATTENTION_Q,
    activation_down,
    attention,
    attention_mask,
    projection_matmul,
    xla_attention,
)
from llama_jax.sharding import constrain, is_sharded

Array = jax.Array
F32 = jnp.float32


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


# Parameter metadata, read by the rest of the code instead of parameter names:
#   logical_axes  the dimensions' logical names (sharding.py maps them to the mesh)
#   decay         whether weight decay applies (optim.decay_mask)
#   embedding     a token/position table or the LM head (flops.count_params)
#   compute_cast  the model reads it only cast to the compute dtype (weights, projection
#                 biases; not the norms' float32 scale and bias), so the train step may cast
#                 it once (step.gradients)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float,
          dtype: jnp.dtype, decay: bool = True, embedding: bool = False) -> nnx.Param:
    """A normal(0, std) weight."""
    value = (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)
    return nnx.Param(value, logical_axes=names, decay=decay, embedding=embedding,
                     compute_cast=True)


def bias(shape: tuple[int, ...], names: tuple[str, ...], dtype: jnp.dtype,
         compute_cast: bool = True) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=names, decay=False, embedding=False,
                     compute_cast=compute_cast)


def ones_param(shape: tuple[int, ...], names: tuple[str, ...], dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=names, decay=False, embedding=False,
                     compute_cast=False)


def metadata_mask(state: nnx.State, key: str, default: bool) -> Any:
    """Each parameter's `key` metadata (`default` where it has none) as a pure-dict tree of
    bools shaped like the train state's parameters."""
    return nnx.to_pure_dict(nnx.map_state(
        lambda _, v: v.replace(value=bool(v.get_metadata().get(key, default))), state))


class Norm(nnx.Module):
    """RMSNorm (LLaMA) or LayerNorm (GPT-NeoX), always computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdtype = dtype_of(cfg.param_dtype)
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.out_dtype = dtype_of(cfg.compute_dtype)
        self.scale = ones_param((cfg.hidden_size,), ("norm",), pdtype)
        d, is_layernorm = cfg.hidden_size, cfg.norm == "layernorm"
        self.bias = bias((d,), ("norm",), pdtype, compute_cast=False) if is_layernorm else None

    def __call__(self, x_BxTxD: Array) -> Array:
        x = x_BxTxD.astype(F32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(F32)
        if self.bias is not None:
            x = x + self.bias[...].astype(F32)
        return x.astype(self.out_dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF rotate-half layout)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotated dims, with linear or llama3 scaling applied."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling.type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.type == "llama3":
        # Meta's llama3 rule: keep high frequencies, divide low ones by `factor`, and blend
        # smoothly in between (transformers' _compute_llama3_parameters).
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_BxTxNxH: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
    """Rotate the first `2 * len(inv_freq)` dims of each head; the rest pass through."""
    rot = 2 * inv_freq.shape[0]
    angles_BxTxR = positions_BxT[..., None].astype(F32) * jnp.asarray(inv_freq)
    angles_BxTx1xR = jnp.concatenate([angles_BxTxR, angles_BxTxR], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xR), jnp.sin(angles_BxTx1xR)
    x = x_BxTxNxH.astype(F32)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


@flax.struct.dataclass
class LayerCache:
    """One layer's keys and values for decoding; `valid` marks filled, non-padding slots."""

    k: Array  # [B, S, K, H]
    v: Array  # [B, S, K, H]
    valid: Array  # [B, S] bool
    index: Array  # int32 scalar: where this call's first token goes


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_size
        pdtype, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pdtype)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pdtype)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pdtype)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pdtype)
        if cfg.attention_bias:
            self.q_bias = bias((n, h), ("heads", "head_dim"), pdtype)
            self.k_bias = bias((k, h), ("kv_heads", "head_dim"), pdtype)
            self.v_bias = bias((k, h), ("kv_heads", "head_dim"), pdtype)
            self.o_bias = bias((d,), ("embed",), pdtype)

    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def project_qkv(self, x_BxTxD: Array, positions_BxT: Array,
                    fp8: LayerScales | None = None) -> tuple[Array, Array, Array]:
        cd, matmul = x_BxTxD.dtype, projection_matmul(self.cfg)

        def project(name: str, w_DxNxH: Array) -> Array:
            d, n, h = w_DxNxH.shape
            y = matmul(x_BxTxD, operand(fp8, name, w_DxNxH.astype(cd).reshape(d, n * h)))
            return y.reshape(*y.shape[:-1], n, h)

        q, k, v = (project("q_proj", self.q_proj[...]), project("k_proj", self.k_proj[...]),
                   project("v_proj", self.v_proj[...]))
        if self.cfg.attention_bias:
            q, k, v = (q + self.q_bias[...].astype(cd), k + self.k_bias[...].astype(cd),
                       v + self.v_bias[...].astype(cd))
        if self.cfg.position == "rope":
            inv_freq = rope_inv_freq(self.cfg)
            q = apply_rope(q, positions_BxT, inv_freq)
            k = apply_rope(k, positions_BxT, inv_freq)
        q = checkpoint_name(constrain(q, ("batch", "length", "heads", "head_dim")), ATTENTION_Q)
        k = checkpoint_name(constrain(k, ("batch", "length", "kv_heads", "head_dim")),
                            ATTENTION_K)
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def attend(self, q: Array, k: Array, v: Array, positions_BxT: Array,
               segment_ids_BxT: Array | None) -> Array:
        """Causal attention within documents; over the devices that split the sequence
        (context parallelism) when `length` is sharded."""
        scale = 1.0 / math.sqrt(self.cfg.head_size)
        if is_sharded("length"):
            return context_parallel.attention(q, k, v, positions_BxT, segment_ids_BxT,
                                              kind=self.cfg.context_parallel, scale=scale,
                                              block=self.cfg.attention_block)
        return attention(q, k, v, segment_ids_BxT, impl=self.cfg.attention, scale=scale,
                         block=self.cfg.attention_block,
                         max_segments=self.cfg.max_segments_per_row)

    def project_out(self, out_BxTxNxH: Array, fp8: LayerScales | None = None) -> Array:
        n, h, d = self.o_proj.shape
        flat = out_BxTxNxH.reshape(*out_BxTxNxH.shape[:-2], n * h)
        matmul = projection_matmul(self.cfg)
        y = matmul(flat, operand(fp8, "o_proj",
                                 self.o_proj[...].astype(flat.dtype).reshape(n * h, d)))
        if self.cfg.attention_bias:
            y = y + self.o_bias[...].astype(y.dtype)
        return y

    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None,
                 fp8: LayerScales | None = None) -> Array:
        """`fp8`: this layer's delayed fp8 scales (model.fp8_scaling=delayed), else None."""
        q, k, v = self.project_qkv(x_BxTxD, positions_BxT, fp8)
        return self.project_out(self.attend(q, k, v, positions_BxT, segment_ids_BxT), fp8)

    def cached(self, x_BxTxD: Array, positions_BxT: Array, cache: LayerCache
               ) -> tuple[Array, LayerCache]:
        """Attend over the cache after writing this call's keys and values at `cache.index`."""
        q, k, v = self.project_qkv(x_BxTxD, positions_BxT)
        at = (0, cache.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
        v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
        k_all = constrain(k_all, ("batch", None, "kv_heads", "head_dim"))
        v_all = constrain(v_all, ("batch", None, "kv_heads", "head_dim"))
        mask = attention_mask(None, q.shape[1], k_all.shape[1], cache.index) & cache.valid[:, None]
        scale = 1.0 / math.sqrt(self.cfg.head_size)
        out = xla_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, scale)
        return self.project_out(out), LayerCache(k_all, v_all, cache.valid, cache.index)


class MLP(nnx.Module):
    """SwiGLU (LLaMA: `intermediate_size` is each projection's width) or GELU (GPT-NeoX)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pdtype, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.activation = cfg.activation
        self.use_bias = cfg.mlp_bias
        self.cfg = cfg
        if cfg.activation == "swiglu":
            self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), std, pdtype)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), std, pdtype)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), std, pdtype)
        if cfg.mlp_bias:
            if cfg.activation == "swiglu":
                self.gate_bias = bias((f,), ("mlp",), pdtype)
            self.up_bias = bias((f,), ("mlp",), pdtype)
            self.down_bias = bias((d,), ("embed",), pdtype)

    @staticmethod
    def projections(cfg: ModelConfig) -> tuple[str, ...]:
        return ("gate_proj", "up_proj", "down_proj") if cfg.activation == "swiglu" else (
            "up_proj", "down_proj")

    def __call__(self, x_BxTxD: Array, fp8: LayerScales | None = None) -> Array:
        cd = x_BxTxD.dtype
        matmul = projection_matmul(self.cfg)
        up = matmul(x_BxTxD, operand(fp8, "up_proj", self.up_proj[...].astype(cd)))
        if self.use_bias:
            up = up + self.up_bias[...].astype(cd)
        gate = None
        if self.activation == "swiglu":
            gate = matmul(x_BxTxD, operand(fp8, "gate_proj", self.gate_proj[...].astype(cd)))
            if self.use_bias:
                gate = gate + self.gate_bias[...].astype(cd)
        y = activation_down(self.activation, matmul, up, gate,
                            operand(fp8, "down_proj", self.down_proj[...].astype(cd)))
        if self.use_bias:
            y = y + self.down_bias[...].astype(cd)
        return y


