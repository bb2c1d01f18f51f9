"""Loss scaling for float16 compute, and what a run does with a step whose loss or gradients
are not finite.

float16 has 10 mantissa bits and a range of 6e-8 to 65504: the gradients of a token-mean loss
(about 1e-6 per token at the logits of a 2,048-token batch) fall under its smallest value and
become zero. Multiplying the loss by a scale S before the backward lifts them into range; the
gradients are divided by S again in float32 before the optimizer sees them. Too large an S
overflows to Inf instead, so the dynamic scale backs off on overflow and grows again after a
window of good steps (DeepSpeed's `DynamicLossScaler`, whose settings GPT-NeoX's fp16 configs
use: initial scale 2^12, window 1000, hysteresis 2, minimum 1).

The skipping itself is optax's `apply_if_finite`: a non-finite gradient leaves the parameters
and the optimizer state as they were (its `total_notfinite` is the run's `skipped_steps`). The
scale's schedule is written here because no maintained JAX library has DeepSpeed's hysteresis.

Every state carries a `loss_scale` entry, whatever the dtype, so `model.compute_dtype` and
`train.loss_scale` can change on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import Config
from llama_jax.errors import LlamaJaxError

MODES = {"none": 0, "static": 1, "dynamic": 2}
FLOAT16_MAX = 65504.0
MAX_SCALE = 2.0**64  # growth stops here without float16: far below float32's largest value
NEVER = np.iinfo(np.int32).max  # apply_if_finite's give-up count: never apply a NaN update


class NonFiniteStep(LlamaJaxError):
    """A step's loss or gradients were not finite, the loss scale did not absorb it, and
    `train.on_nonfinite` is not skip: the loop stops or rolls back."""

    def __init__(self, step: int, what: str):
        super().__init__(f"step {step}: {what}")
        self.step, self.what = step, what


@dataclass(frozen=True)
class LossScale:
    """`train.loss_scale` and its settings, resolved against the compute dtype."""

    mode: str  # none | static | dynamic
    init: float
    window: int
    hysteresis: int
    minimum: float
    ceiling: float = MAX_SCALE

    @classmethod
    def from_config(cls, cfg: Config) -> LossScale:
        """Under float16 compute a dynamic scale stays at or below float16's largest value
        times the batch's tokens: the backward's first float16 value, the logits' gradient,
        is up to scale / tokens, so any larger scale overflows whatever the model (and an
        absurd `loss_scale_init` costs a few skipped steps, not one per halving)."""
        t = cfg.train
        kind = t.loss_scale
        if kind == "auto":
            kind = "dynamic" if cfg.model.compute_dtype == "float16" else "none"
        settings = (t.loss_scale_window, t.loss_scale_hysteresis, float(t.loss_scale_min))
        if kind == "none":
            return cls("none", 1.0, *settings)
        if kind != "dynamic":
            return cls("static", float(kind), *settings)
        ceiling = MAX_SCALE
        if cfg.model.compute_dtype == "float16":
            ceiling = FLOAT16_MAX * t.global_batch_size * cfg.data.seq_len
        ceiling = max(ceiling, float(t.loss_scale_min))
        return cls("dynamic", min(float(t.loss_scale_init), ceiling), *settings, ceiling)

    def initial(self) -> dict[str, jax.Array]:
        return {"scale": jnp.asarray(self.init, jnp.float32),
                "good_steps": jnp.zeros((), jnp.int32),
                "hysteresis": jnp.asarray(self.hysteresis, jnp.int32),
                "mode": jnp.asarray(MODES[self.mode], jnp.int32)}

    def reconcile(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The restored scale state, or a fresh one when the run's scaling changed on resume:
        a dynamic scale goes on from where it was; anything else starts as configured."""
        if self.mode == "dynamic" and int(saved["mode"]) == MODES["dynamic"]:
            return saved
        fresh = self.initial()
        return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), fresh, saved)

    def absorbs(self, state: dict[str, jax.Array]) -> jax.Array:
        """Whether a non-finite step is an overflow this scale handles by backing off (dynamic,
        above its floor); any other is for `train.on_nonfinite` to decide."""
        return jnp.asarray(self.mode == "dynamic") & (state["scale"] > self.minimum)

    def update(self, state: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
        """DeepSpeed's schedule: an overflow first uses up the hysteresis, then halves the
        scale (not below the minimum) at each further overflow; `window` good steps since the
        last overflow or growth double it (not above the ceiling) and refill the
        hysteresis."""
        if self.mode != "dynamic":
            return state
        scale, good, left = state["scale"], state["good_steps"], state["hysteresis"]
        halve = ~finite & (left <= 1)
        grow = finite & (good + 1 >= self.window)
        scale = jnp.where(halve, jnp.maximum(scale / 2, self.minimum), scale)
        scale = jnp.where(grow, jnp.minimum(scale * 2, self.ceiling), scale)
        left = jnp.where(~finite & (left > 1), left - 1, left)
        left = jnp.where(grow, self.hysteresis, left)
        good = jnp.where(finite & ~grow, good + 1, 0)
        return {**state, "scale": scale, "good_steps": good, "hysteresis": left}


def on_nonfinite(cfg: Config) -> str:
    """`train.on_nonfinite`, with `auto` resolved: skip under float16 (where overflows are
    routine), stop otherwise (where a NaN means the run went wrong)."""
    policy = cfg.train.on_nonfinite
    if policy == "auto":
        return "skip" if cfg.model.compute_dtype == "float16" else "stop"
    return policy


def first_unabsorbed(first_step: int, host: list[dict[str, Any]]) -> tuple[int, str] | None:
    """(step, what was not finite) of the first step among `host` (the fetched metrics of
    steps first_step, first_step + 1, ...) that the loss scale did not absorb."""
    for i, m in enumerate(host):
        if not bool(m["finite"]) and not bool(m["absorbed"]):
            what = ("the gradients are NaN/Inf (the loss is finite)" if bool(m["loss_finite"])
                    else "the loss is NaN/Inf")
            return first_step + i, what
    return None
