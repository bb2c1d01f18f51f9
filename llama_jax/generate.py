"""Sampling with a KV cache: one compiled prefill, one compiled decode loop.

Prompts of different lengths are left-padded; padding slots stay invalid in the cache and each
sequence's positions start at 0 at its first real token, so a padded prompt decodes exactly as
it would alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import sharding
from llama_jax.errors import LlamaJaxError
from llama_jax.model import KVCache, decode

PyTree = Any


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    eos_id: int = -1  # -1: never stop early

    def __post_init__(self) -> None:
        """The CLI checks its flags the same way; this is for `api` callers (a negative
        temperature sampled from the flipped distribution, max_new_tokens=0 raised an
        IndexError from deep in the loop)."""
        for name, ok, rule in (("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                               ("temperature", self.temperature >= 0.0, ">= 0"),
                               ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
                               ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]")):
            if not ok:
                raise LlamaJaxError(f"{name}={getattr(self, name)} must be {rule}")


def sample_token(logits_BxV: jax.Array, rng: jax.Array, s: SamplingConfig) -> jax.Array:
    if s.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the best token)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < s.top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


_COMPILED: dict[tuple, Any] = {}


def _compiled(graphdef: nnx.GraphDef, s: SamplingConfig, mesh: Mesh | None,
              rules_items: tuple) -> Any:
    """One jitted generator per (model graph, sampling settings, mesh): the graph holds the
    (unhashable) model config, so it is closed over rather than passed as a static arg."""
    key = (id(graphdef), s, id(mesh), rules_items)
    if key not in _COMPILED:
        # The tokens come back whole to every process: under a multi-host mesh a batch
        # sharded over the devices would leave each process unable to read other hosts' rows.
        out_shardings = None if mesh is None else sharding.replicated(mesh)
        _COMPILED[key] = jax.jit(functools.partial(_generate, graphdef, s=s, mesh=mesh,
                                                   rules_items=rules_items),
                                 out_shardings=out_shardings)
    return _COMPILED[key]


def _generate(graphdef: nnx.GraphDef, params: PyTree, prompt_BxP: jax.Array,
              pad_B: jax.Array, rng: jax.Array, s: SamplingConfig, mesh: Mesh | None,
              rules_items: tuple) -> jax.Array:
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    b, p = prompt_BxP.shape
    length = p + s.max_new_tokens
    with sharding.activation_sharding(mesh, dict(rules_items)):
        cache = KVCache.empty(cfg, b, length, jnp.dtype(cfg.compute_dtype))
        slots = jnp.arange(length)[None, :]
        cache = cache.replace(valid=(slots >= pad_B[:, None]) & (slots < p))
        positions = jnp.maximum(jnp.arange(p)[None, :] - pad_B[:, None], 0)
        logits, cache = decode(model, prompt_BxP, positions, cache)
        rng, key = jax.random.split(rng)
        first = sample_token(logits[:, -1], key, s)
        out = jnp.full((b, s.max_new_tokens), s.eos_id if s.eos_id >= 0 else 0, jnp.int32)
        out = out.at[:, 0].set(first)
        done = first == s.eos_id

        def cond(carry: tuple) -> jax.Array:
            t, _, _, done, _ = carry
            return (t < s.max_new_tokens) & ~jnp.all(done)

        def body(carry: tuple) -> tuple:
            t, cache, out, done, rng = carry
            token = out[:, t - 1][:, None]
            pos = (p + t - 1 - pad_B)[:, None]
            cache = cache.replace(valid=cache.valid.at[:, p + t - 1].set(True))
            logits, cache = decode(model, token, pos, cache)
            rng, key = jax.random.split(rng)
            nxt = sample_token(logits[:, -1], key, s)
            nxt = jnp.where(done, out[:, t], nxt)  # finished rows keep their EOS padding
            return t + 1, cache, out.at[:, t].set(nxt), done | (nxt == s.eos_id), rng

        _, _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done, rng))
    return out


def check_token_ids(ids: np.ndarray | list[list[int]], vocab_size: int) -> None:
    """Refuse ids the embedding has no row for: XLA's gather would clamp or fill them and the
    logits come out as NaN or garbage, never an error."""
    flat = np.concatenate([np.asarray(r, np.int64).ravel() for r in ids]) if len(ids) else []
    bad = [int(t) for t in flat if not 0 <= t < vocab_size]
    if bad:
        raise LlamaJaxError(f"token id {bad[0]} is outside the vocabulary ({vocab_size} "
                            f"tokens: ids 0..{vocab_size - 1})")


def check_positions(length: int, params: PyTree, hint: str = "") -> None:
    """Refuse a sequence of `length` positions longer than a learned position table: its
    gather past the last row would clamp or fill, and the logits turn to garbage with no
    error. Rotary positions have no table and extrapolate, as in transformers."""
    rows = learned_positions(params)
    if rows is not None and length > rows:
        raise LlamaJaxError(f"{length} positions (0..{length - 1}) run past the model's {rows} "
                            f"learned positions (model.max_position_embeddings){hint}")


def learned_positions(params: PyTree) -> int | None:
    """The rows of the learned position table, None under rotary positions."""
    return params["pos_embed"].shape[0] if "pos_embed" in params else None


def generate_ids(graphdef: nnx.GraphDef, params: PyTree, prompts: list[list[int]],
                 sampling: SamplingConfig, seed: int = 0, mesh: Mesh | None = None,
                 rules: dict[str, list[str]] | None = None) -> list[list[int]]:
    """Continuations of token-id prompts (each stops after EOS, which is kept)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlamaJaxError("every prompt needs at least one token")
    check_token_ids(prompts, params["embed"].shape[0])
    width = max(len(p) for p in prompts)
    # The last token sampled is never fed back, so it takes no position.
    room = max(0, (learned_positions(params) or 0) - width + 1)
    check_positions(width + sampling.max_new_tokens - 1, params,
                    f"; the longest prompt has {width} tokens, so at most {room} new tokens")
    pad = np.array([width - len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, pad[i]:] = p
    rules_items = tuple((k, tuple(v)) for k, v in sorted((rules or {}).items()))
    run = _compiled(graphdef, sampling, mesh, rules_items)
    out = np.asarray(run(params, jnp.asarray(tokens), jnp.asarray(pad), jax.random.key(seed)))
    results = []
    for row in out.tolist():
        if sampling.eos_id >= 0 and sampling.eos_id in row:
            row = row[: row.index(sampling.eos_id) + 1]
        results.append(row)
    return results
