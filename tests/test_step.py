"""The compiled step: gradient accumulation, the chunked loss, learning, XLA:CPU compile
options."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import grads_and_loss, layout_overrides, tiny

from llama_jax.data.batch import to_global
from llama_jax.data.synthetic import SyntheticSource
from llama_jax.step import init_state, make_setup, make_train_step


def test_gradient_accumulation_equals_full_batch(tmp_path):
    base = ["train.global_batch_size=8", *layout_overrides("data=2,fsdp=2,tensor=2")]
    cfg_full = tiny(tmp_path, *base)
    cfg_accum = tiny(tmp_path, *base, "train.microbatches=2")
    batch = next(SyntheticSource(cfg_full.model.vocab_size, cfg_full.data.seq_len, 8, 3, "train"))
    batch["weights"][1, 40:] = 0.0  # uneven token counts across microbatches
    full_grads, full_loss = grads_and_loss(cfg_full, batch)
    accum_grads, accum_loss = grads_and_loss(cfg_accum, batch)
    assert accum_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(accum_grads), strict=True):
        scale = np.abs(a).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def _casts_to_bf16(jaxpr, shape: tuple[int, ...]) -> int:
    """float32 -> bfloat16 converts of arrays of `shape` in a jaxpr and every jaxpr in it."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16:
            aval = eqn.invars[0].aval
            count += aval.dtype == jnp.float32 and tuple(aval.shape) == shape
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _casts_to_bf16(sub, shape)
    return count


@pytest.mark.parametrize("layout", ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
def test_weights_are_cast_once_per_step_with_the_gradients_of_casting_in_the_layers(
        tmp_path, layout):
    """bf16 compute, float32 weights, two microbatches, a remat policy: each weight is cast
    once per step (casting in the layers cast it in every microbatch's forward and again in
    its backward: four times here), and the gradients are those of the model that casts in
    its layers, differentiated as it is (the cast's transpose is the same cast back), up to
    bf16 rounding."""
    from llama_jax import sharding
    from llama_jax.step import _forward_sums, gradients

    cfg = tiny(tmp_path, "model.compute_dtype=bfloat16", "model.remat=projections_and_attention",
               "model.scan_layers=false", "train.microbatches=2", "train.global_batch_size=8",
               *layout_overrides(layout))
    setup = make_setup(cfg)
    state = init_state(setup)
    batch = next(SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, 8, 3, "train"))
    batch["weights"][1, 40:] = 0.0
    batch = to_global(batch, setup.mesh, setup.rules, 8)
    q_shape = tuple(state["params"]["layers"][0]["attn"]["q_proj"].shape)
    traced = jax.make_jaxpr(lambda p, b: gradients(setup, p, b)[0])(state["params"], batch)
    assert _casts_to_bf16(traced.jaxpr, q_shape) == cfg.model.num_layers  # every layer's Q once

    def in_layers(params, b):  # the whole batch at once: the microbatches sum to it
        total, _ = _forward_sums(setup, params, b)
        return total / jnp.maximum(b["weights"].sum(), 1.0)

    with sharding.activation_sharding(setup.mesh, setup.rules):  # the backward traced too
        expected = jax.jit(jax.grad(in_layers))(state["params"], batch)
    got = jax.jit(lambda p, b: gradients(setup, p, b)[0])(state["params"], batch)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        # bf16 sums in another order (two microbatches against one batch): 0.45% measured
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(np.abs(a).max()))


@pytest.mark.parametrize("layout", ["fsdp=2,sequence=4", "data=2,fsdp=2,tensor=2"])
def test_chunked_loss_equals_one_pass_in_the_step(tmp_path, layout):
    """model.loss_chunks inside the sharded step (z-loss on, padding): loss and every
    parameter's gradient equal the one-pass fused head, whatever the layout splits."""
    base = ["train.z_loss=1e-3", *layout_overrides(layout)]
    cfg_one = tiny(tmp_path, *base, "model.loss_chunks=1")
    batch = next(SyntheticSource(cfg_one.model.vocab_size, cfg_one.data.seq_len, 8, 3, "train"))
    batch["weights"][1, 40:] = 0.0
    one_grads, one_loss = grads_and_loss(cfg_one, batch)
    chunked = tiny(tmp_path, *base, "model.loss_chunks=4")
    chunk_grads, chunk_loss = grads_and_loss(chunked, batch)
    assert chunk_loss == pytest.approx(one_loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(one_grads), jax.tree.leaves(chunk_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_overfits_one_batch(tmp_path):
    cfg = tiny(tmp_path, "optimizer.lr=1e-2", "optimizer.schedule=constant",
               "optimizer.warmup_steps=0", "optimizer.weight_decay=0",
               *layout_overrides("fsdp=4,tensor=2"))
    setup = make_setup(cfg)
    state = init_state(setup)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((8, cfg.data.seq_len), np.float32),
             "positions": np.tile(np.arange(cfg.data.seq_len, dtype=np.int32), (8, 1)),
             "segment_ids": np.ones((8, cfg.data.seq_len), np.int32)}
    batch = to_global(local, setup.mesh, setup.rules, 8)
    step = make_train_step(setup)
    for _ in range(150):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1


def test_cpu_compile_options_are_dropped_where_xla_does_not_know_them(tmp_path, monkeypatch):
    """The CPU options are probed, not assumed: with a name this XLA lacks (a newer or older
    jaxlib) the step compiles without them, and with them it computes the same step."""
    from llama_jax import platform
    from llama_jax.bench import compiled_random_step

    setup = make_setup(tiny(tmp_path))
    assert platform.compiler_options(setup.mesh) == platform.CPU_COMPILER_OPTIONS
    state, batch, step, _ = compiled_random_step(setup)
    _, with_options = step(state, batch)

    monkeypatch.setitem(platform.CPU_COMPILER_OPTIONS, "xla_cpu_no_such_option", True)
    platform._options_accepted.cache_clear()
    try:
        assert platform.compiler_options(setup.mesh) is None
        state, batch, step, _ = compiled_random_step(setup)
        _, without = step(state, batch)
    finally:
        platform._options_accepted.cache_clear()
    np.testing.assert_array_equal(with_options["loss"], without["loss"])
