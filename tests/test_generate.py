"""KV-cache decoding against full forward passes, and the samplers."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS
from flax import nnx

from llama_jax.config import load_config
from llama_jax.errors import LlamaJaxError
from llama_jax.generate import SamplingConfig, generate_ids, sample_token
from llama_jax.model import Transformer

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls

NEOX = ["model.norm=layernorm", "model.activation=gelu", "model.parallel_residual=true",
        "model.rotary_pct=0.5", "model.attention_bias=true"]


# Both architectures, scanned and unrolled (the reference compiles once per case: seconds).
@pytest.mark.parametrize("arch, scan", [
    pytest.param([], True, id="llama-True"),
    pytest.param(NEOX, False, id="neox-False"),
    pytest.param([], False, id="llama-False"),
    pytest.param(NEOX, True, id="neox-True"),
])
def test_greedy_cache_decoding_equals_full_forward_argmax(tiny_overrides, scan, arch):
    cfg = load_config(CONFIGS / "tiny.yaml", [*tiny_overrides, *arch]).model
    cfg = dataclasses.replace(cfg, scan_layers=scan, init_std=0.3)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3]]  # different lengths: left padding
    out = generate_ids(graphdef, nnx.to_pure_dict(state), prompts,
                       SamplingConfig(max_new_tokens=8))
    # The reference: a full causal forward over the sequence so far, right-padded to one
    # length (what follows a position cannot change it), so it compiles once.
    total = max(map(len, prompts)) + 8
    forward = jax.jit(model.__call__)
    for prompt, continuation in zip(prompts, out, strict=True):
        seq = list(prompt)
        for _ in range(8):
            logits = forward(jnp.array([seq + [0] * (total - len(seq))]))[0, len(seq) - 1]
            seq.append(int(jnp.argmax(logits)))
        assert continuation == seq[len(prompt):]


def test_generation_stops_at_eos(tiny_overrides):
    cfg = dataclasses.replace(load_config(CONFIGS / "tiny.yaml", tiny_overrides).model,
                              init_std=0.3)
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    free = generate_ids(graphdef, nnx.to_pure_dict(state), [[1, 2, 3]],
                        SamplingConfig(max_new_tokens=8))[0]
    eos = free[2]  # make the third generated token the end of sequence
    stopped = generate_ids(graphdef, nnx.to_pure_dict(state), [[1, 2, 3]],
                           SamplingConfig(max_new_tokens=8, eos_id=eos))[0]
    assert stopped == free[: free.index(eos) + 1]


def test_top_k_and_top_p_restrict_the_choice():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 300)
    top1 = {int(sample_token(logits, k, SamplingConfig(temperature=1.0, top_k=1))[0])
            for k in keys[:50]}
    assert top1 == {0}
    nucleus = {int(sample_token(logits, k, SamplingConfig(temperature=1.0, top_p=0.7))[0])
               for k in keys}
    assert nucleus == {0, 1}
    free = {int(sample_token(logits, k, SamplingConfig(temperature=1.0))[0]) for k in keys}
    assert free == {0, 1, 2, 3}


def test_learned_positions_bound_the_length(tiny_overrides):
    """A continuation that would run past a learned position table is refused (its gather
    would clamp and sample garbage with no error); the longest that fits runs."""
    cfg = load_config(CONFIGS / "tiny.yaml", [*tiny_overrides, "model.position=learned",
                                              "model.max_position_embeddings=16"]).model
    graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    prompts = [[1, 2, 3, 4], [5]]  # the longest prompt sets the positions used
    assert len(generate_ids(graphdef, params, prompts, SamplingConfig(max_new_tokens=13))[0]) \
        == 13
    with pytest.raises(LlamaJaxError, match=r"17 positions \(0..16\) run past the model's 16 "
                                            r"learned positions .* at most 13 new tokens"):
        generate_ids(graphdef, params, prompts, SamplingConfig(max_new_tokens=14))


@pytest.mark.parametrize("setting, rule", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be >= 1"),
    ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
    ({"top_k": -2}, "top_k=-2 must be >= 0"),
    ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
])
def test_sampling_settings_are_checked_for_api_callers(setting, rule):
    """The CLI's flags are checked by argparse; `api.Model.generate` builds the same
    SamplingConfig (max_new_tokens=0 raised an IndexError, a negative temperature sampled)."""
    with pytest.raises(LlamaJaxError, match=re.escape(rule)):
        SamplingConfig(**setting)
