"""The optimizer: which parameters weight decay reaches, and the schedules' formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS
from flax import nnx
from helpers import flat_tree

from llama_jax.config import load_config
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer


def test_weight_decay_skips_norms_biases_and_embeddings():
    cfg = load_config(CONFIGS / "tiny.yaml", NEOX_OVERRIDES + ["optimizer.weight_decay=0.5",
                                                               "optimizer.lr=0.1",
                                                               "optimizer.schedule=constant",
                                                               "optimizer.warmup_steps=0"])
    from llama_jax.model import Transformer

    state = nnx.state(Transformer(cfg.model, nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x + 1.0, nnx.to_pure_dict(state))  # no zero biases
    tx = make_optimizer(cfg.optimizer, 10, decay_mask(state))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = flat_tree(decay_mask(state))
    flat_old, flat_new = flat_tree(params), flat_tree(new)
    skipped = {n for n, decays in mask.items() if not decays}
    assert skipped == {n for n in flat_old if n in ("embed", "pos_embed")
                       or n.endswith(("scale", "bias"))}
    assert {"embed", "final_norm/bias", "layers/attn/q_bias", "layers/mlp/up_bias"} <= skipped
    for name in flat_old:
        if name in skipped:
            np.testing.assert_array_equal(flat_new[name], flat_old[name], err_msg=name)
        else:
            np.testing.assert_allclose(flat_new[name], flat_old[name] * (1 - 0.1 * 0.5),
                                       rtol=1e-6, err_msg=name)


NEOX_OVERRIDES = ["model.norm=layernorm", "model.activation=gelu", "model.attention_bias=true",
                  "model.mlp_bias=true", "model.parallel_residual=true"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
def test_schedules_match_their_formula(schedule):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"optimizer.schedule={schedule}",
                                             "optimizer.lr=1.0", "optimizer.warmup_steps=10",
                                             "optimizer.min_lr_ratio=0.1",
                                             "optimizer.decay_fraction=0.2"])
    total, peak, floor = 110, 1.0, 0.1
    fn = lr_schedule(cfg.optimizer, total)

    def expected(t):
        if t < 10:
            return peak * t / 10
        frac = (t - 10) / 100
        if schedule == "constant":
            return peak
        if schedule == "cosine":
            return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return peak + (floor - peak) * frac
        decay_start = total - 22  # 20% of 110 steps
        if t < decay_start:
            return peak
        return peak + (floor - peak) * (t - decay_start) / 22

    for t in [0, 5, 10, 11, 40, 60, 87, 88, 99, 110]:
        assert float(fn(t)) == pytest.approx(expected(t), abs=1e-6), t
