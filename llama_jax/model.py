"""The decoder: embedding, a stack of blocks (scanned by default), final norm, LM head.

One class covers LLaMA (RMSNorm, SwiGLU, RoPE, sequential residual) and GPT-NeoX (LayerNorm,
GELU, partial rotary, parallel residual, biases): the differences are config switches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.config import ModelConfig
from llama_jax.fp8 import LayerScales
from llama_jax.layers import MLP, Attention, LayerCache, Norm, dtype_of, param
from llama_jax.ops import (
    ATTENTION_K,
    ATTENTION_LSE,
    ATTENTION_OUT,
    ATTENTION_Q,
    HeadProduct,
    embedding_lookup,
    head_matmul,
)
from llama_jax.sharding import constrain

Array = jax.Array

# The forward primitives of fused attention kernels (jax.nn.dot_product_attention with
# implementation="cudnn"; the wrapper is what a jaxpr holds, the inner one what it lowers to).
FUSED_ATTENTION_FORWARDS = frozenset({
    "dot_product_attention_fwd_wrapper", "dot_product_attention_fwd",
    "dot_product_attention_fp8_fwd_wrapper", "dot_product_attention_fp8_fwd",
})


def _fused_attention_outputs(prim: Any, *_: Any, **__: Any) -> bool:
    """Save what a fused attention kernel's forward returns (its output and log-sum-exp).

    Why: its custom VJP hands the backward kernel those two as residuals; a policy that only
    knows dots does not save them, so the backward pass ran cuDNN's whole forward kernel again
    in every layer (32 forward launches for 16 layers in the H200 profile, about 13 ms of a
    510 ms Llama 3.2 1B step).
    """
    return prim.name in FUSED_ATTENTION_FORWARDS


REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Matmul outputs, attention's rotated Q and K, and its output and log-sum-exp (XLA's, named
    # in layers.py, or a fused kernel's): what the backward needs that is not cheap to
    # recompute. Norms, the activation and residual adds are recomputed. The rotated Q and K
    # replace the projections' outputs as residuals (the projections' backward needs only
    # their inputs), so they cost no memory and save the backward's second rotation.
    "projections_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE,
                                                          ATTENTION_Q, ATTENTION_K)),
        _fused_attention_outputs),
    # What dots_with_no_batch_dims_saveable saves, kept in pinned host memory instead of on
    # the device, copied back for the backward: device memory of `full`, recompute of dots.
    "offload_dots_with_no_batch_dims": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}
# Policies that move saved activations to host memory: GPU and TPU only.
OFFLOAD_POLICIES = frozenset({"offload_dots_with_no_batch_dims"})


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.parallel_residual = cfg.parallel_residual
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None,
                 fp8: LayerScales | None = None) -> Array:
        attn_out = self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT,
                             None if fp8 is None else fp8.of("attn"))
        return self._residual(x_BxTxD, attn_out, None if fp8 is None else fp8.of("mlp"))

    def cached(self, x_BxTxD: Array, positions_BxT: Array, cache: LayerCache
               ) -> tuple[Array, LayerCache]:
        attn_out, cache = self.attn.cached(self.attn_norm(x_BxTxD), positions_BxT, cache)
        return self._residual(x_BxTxD, attn_out), cache

    def _residual(self, x_BxTxD: Array, attn_out: Array, fp8: LayerScales | None = None
                  ) -> Array:
        if self.parallel_residual:
            y = x_BxTxD + attn_out + self.mlp(self.mlp_norm(x_BxTxD), fp8)
        else:
            h = x_BxTxD + attn_out
            y = h + self.mlp(self.mlp_norm(h), fp8)
        return constrain(y, ("batch", "length", "embed"))


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading `layers` dimension, for `lax.scan`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    state = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(key))))(keys)
    for _, variable in nnx.to_flat_state(state):
        variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, state)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdtype, std = dtype_of(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std, pdtype,
                           decay=False, embedding=True)
        if cfg.position == "learned":
            self.pos_embed = param(rngs, (cfg.max_position_embeddings, cfg.hidden_size),
                                   ("position", "embed"), std, pdtype, decay=False,
                                   embedding=True)
        if cfg.scan_layers:
            self.layers = stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 std, pdtype, embedding=True)

    def _block_fn(self) -> Callable[..., Array]:
        def run(block: Block, x: Array, positions: Array, segment_ids: Array | None,
                fp8: LayerScales | None) -> Array:
            return block(x, positions, segment_ids, fp8)

        policy = self.cfg.remat
        if policy == "none":
            return run
        return nnx.remat(run, policy=REMAT_POLICIES[policy], prevent_cse=not self.cfg.scan_layers)

    def embed_tokens(self, tokens_BxT: Array, positions_BxT: Array) -> Array:
        cd = dtype_of(self.cfg.compute_dtype)
        f32 = self.cfg.reduce_grads_in_f32
        x = embedding_lookup(self.embed[...], tokens_BxT, ("vocab", "embed"), f32).astype(cd)
        if self.cfg.position == "learned":
            x = x + embedding_lookup(self.pos_embed[...], positions_BxT, ("position", "embed"),
                                     f32).astype(cd)
        return constrain(x, ("batch", "length", "embed"))

    def head_weight(self, dtype: jnp.dtype) -> Array:
        """The LM head as [hidden, vocab] in `dtype` (the embedding's transpose if tied)."""
        if self.cfg.tie_embeddings:
            return self.embed[...].astype(dtype).T
        return self.lm_head[...].astype(dtype)

    def logits(self, x_BxTxD: Array) -> Array:
        """Logits in `model.logits_dtype` (float32 by default): the LM head accumulates in
        float32 whatever the compute dtype."""
        x = self.final_norm(x_BxTxD)
        logits = head_matmul(x, self.head_weight(x.dtype), HeadProduct.of(self.cfg))
        return constrain(logits, ("batch", "length", "vocab"))

    def hidden_states(self, tokens_BxT: Array, positions_BxT: Array | None = None,
                      segment_ids_BxT: Array | None = None, fp8: LayerScales | None = None
                      ) -> Array:
        """The last block's output (before the final norm). `fp8`: every layer's delayed
        fp8 scales, stacked on a leading layer dimension (model.fp8_scaling=delayed)."""
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        x = self.embed_tokens(tokens_BxT, positions_BxT)
        block_fn = self._block_fn()
        x, _ = self.over_layers(
            lambda block, x, mine: (block_fn(block, x, positions_BxT, segment_ids_BxT, mine),
                                    None), x, fp8)
        return x

    def over_layers(self, fn: Callable[[Block, Array, Any], tuple[Array, Any]], x: Array,
                    per_layer: Any) -> tuple[Array, Any]:
        """`fn(block, x, per_layer[i]) -> (x, out_i)` through every layer in order: a
        `lax.scan` over the stacked blocks, or a Python loop over the list. Both take and
        return per-layer values stacked on a leading layer dimension."""
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(carry: Array, inputs: Any) -> tuple[Array, Any]:
                layer_state, mine = inputs
                return fn(nnx.merge(graphdef, layer_state), carry, mine)

            return jax.lax.scan(body, x, (state, per_layer))
        outs = []
        for i, block in enumerate(self.layers):
            x, out = fn(block, x, jax.tree.map(lambda a, i=i: a[i], per_layer))
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
                 segment_ids_BxT: Array | None = None, fp8: LayerScales | None = None
                 ) -> Array:
        return self.logits(self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT, fp8))


def fp8_projections(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The weights of each block that go through fp8 matmuls, by sub-module: what the amax
    histories of delayed scaling are kept for."""
    return {"attn": Attention.PROJECTIONS, "mlp": MLP.projections(cfg)}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, stacked on a leading layer dim (as scanned params are)."""

    k: Array  # [L, B, S, K, H]
    v: Array  # [L, B, S, K, H]
    valid: Array  # [B, S] bool
    index: Array  # int32 scalar

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_size)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def decode(model: Transformer, tokens_BxT: Array, positions_BxT: Array, cache: KVCache
           ) -> tuple[Array, KVCache]:
    """Logits of `tokens` given everything already in the cache; the cache gains them.

    The caller marks the new slots valid in `cache.valid` (padding stays invalid).
    """
    x = model.embed_tokens(tokens_BxT, positions_BxT)

    def layer(block: Block, x: Array, kv: tuple[Array, Array]
              ) -> tuple[Array, tuple[Array, Array]]:
        y, c = block.cached(x, positions_BxT, LayerCache(*kv, cache.valid, cache.index))
        return y, (c.k, c.v)

    x, (ks, vs) = model.over_layers(layer, x, (cache.k, cache.v))
    new_cache = KVCache(ks, vs, cache.valid, cache.index + tokens_BxT.shape[1])
    return model.logits(x), new_cache


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's shapes and metadata without allocating a single parameter."""
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Scanned params (leading `layers` dim) -> one entry per layer, as `scan_layers=False` has."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}}


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """One entry per layer -> scanned params with a leading `layers` dim."""
    per_layer = params["layers"]
    layers = [per_layer[i] for i in range(len(per_layer))]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
