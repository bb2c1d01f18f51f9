"""The optax chain: global-norm clipping, then AdamW with a decay mask and an LR schedule."""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from llama_jax.config import OptimizerConfig
from llama_jax.layers import metadata_mask


def lr_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then constant, cosine, linear or warmup-stable-decay.

    After warmup, cosine and linear go from `lr` to `lr * min_lr_ratio` at `total_steps`;
    wsd holds `lr` until the last `decay_fraction` of the steps, then decays linearly to
    `lr * min_lr_ratio`.
    """
    peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
    warmup = min(opt.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if opt.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(peak, floor, rest)
    else:  # wsd
        decay = max(int(round(opt.decay_fraction * total_steps)), 0)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay, 1))],
            [stable],
        )
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(state: nnx.State) -> Any:
    """True where weight decay applies, as each parameter's `decay` metadata says (norms,
    biases and embedding tables are made with decay=False, layers.py), as a pure-dict tree
    shaped like the train state's parameters."""
    return metadata_mask(state, "decay", True)


def make_optimizer(opt: OptimizerConfig, total_steps: int, decay: Any
                   ) -> optax.GradientTransformation:
    """`decay`: the `decay_mask` of the model's parameters."""
    chain = []
    if opt.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.clip_norm))
    chain.append(
        optax.adamw(lr_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay)
    )
    return optax.chain(*chain)
