"""The train state and its shardings, the loss and its gradients, the compiled train and eval
steps.

The state is a plain pytree {"step", "params", "opt_state"} of pure dicts (no NNX objects), so
jit, Orbax and HF conversion all see ordinary arrays. The NNX graph is split once; each traced
step merges it with the params, which costs nothing at run time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax import context_parallel, platform, sharding
from llama_jax.config import Config
from llama_jax.data.batch import BATCH_KEYS
from llama_jax.data.feed import source_kind
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.loss import auto_chunks, chunked_head_loss_sums, head_loss_sums, loss_sums
from llama_jax.model import OFFLOAD_POLICIES, Transformer
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer

PyTree = Any
Batch = dict[str, jax.Array]


class NonFiniteLoss(LlamaJaxError):
    """The loss or gradient became NaN/Inf."""


# ---------------------------------------------------------------------------------------------
# State and shardings


@dataclass
class Setup:
    """Everything a run derives from its config and mesh, computed once."""

    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    state_shardings: PyTree
    abstract_state: PyTree

    @property
    def rules(self) -> dict[str, list[str]]:
        return self.cfg.mesh.rules

    def batch_shardings(self) -> dict[str, NamedSharding]:
        s = sharding.batch_sharding(self.mesh, self.rules)
        return {k: s for k in BATCH_KEYS}


def make_setup(cfg: Config, mesh: Mesh | None = None) -> Setup:
    mesh = mesh or sharding.make_mesh(cfg)
    platform_name = mesh.devices.flat[0].platform
    if cfg.model.remat in OFFLOAD_POLICIES and platform_name == "cpu":
        raise ConfigError(f"model.remat={cfg.model.remat} offloads activations to pinned host "
                          f"memory, which only GPU and TPU have (this mesh is on CPU; "
                          f"bench --topology compiles for a TPU slice)")
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(cfg.train.seed)))
    graphdef, abstract_vars = nnx.split(abstract)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abstract_vars))
    abstract_params = nnx.to_pure_dict(abstract_vars)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    shardings = sharding.train_state_shardings(abstract_vars, tx, abstract_opt, mesh,
                                               cfg.mesh.rules)
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    warn_replicated(cfg, abstract_vars, mesh)
    return Setup(cfg, mesh, graphdef, tx, shardings, abstract_state)


def warn_replicated(cfg: Config, abstract_vars: PyTree, mesh: Mesh) -> None:
    if mesh.size <= 1:
        return
    fraction, names = sharding.replicated_fraction(abstract_vars, mesh, cfg.mesh.rules)
    if fraction > 0.02 and jax.process_index() == 0:
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        print(f"warning: {fraction:.1%} of parameter bytes are replicated on every device "
              f"({shown}); check mesh.rules", file=sys.stderr)


def init_state(setup: Setup) -> PyTree:
    """Parameters created directly in their shardings; nothing is materialised whole."""
    cfg = setup.cfg

    def init() -> PyTree:
        model = Transformer(cfg.model, nnx.Rngs(cfg.train.seed))
        params = nnx.to_pure_dict(nnx.state(model))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": setup.tx.init(params)}

    return jax.block_until_ready(jax.jit(init, out_shardings=setup.state_shardings)())


# ---------------------------------------------------------------------------------------------
# Steps


def _forward_sums(setup: Setup, params: PyTree, batch: Batch) -> tuple[jax.Array, dict]:
    model = nnx.merge(setup.graphdef, params)
    cfg = setup.cfg
    shards = context_parallel.sequence_shards(setup.mesh, setup.rules)
    if shards > 1:  # every device a front and a back chunk: causal work balanced
        order = jnp.asarray(context_parallel.balanced_order(batch["inputs"].shape[1], shards))
        batch = {key: sharding.constrain(x[:, order], ("batch", "length"))
                 for key, x in batch.items()}
    packed = source_kind(cfg).packed
    args = (batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None)
    if not cfg.train.fused_loss:
        return loss_sums(model(*args), batch["targets"], batch["weights"], cfg.train.z_loss)
    x = model.final_norm(model.hidden_states(*args))
    w = model.head_weight(x.dtype)
    chunks = loss_chunks(setup, x.shape[0])
    if chunks == 1:
        return head_loss_sums(x, w, batch["targets"], batch["weights"], cfg.train.z_loss)
    return chunked_head_loss_sums(x, w, batch["targets"], batch["weights"], cfg.train.z_loss,
                                  chunks)


def loss_chunks(setup: Setup, rows: int) -> int:
    """`model.loss_chunks`, or when 0 the slices that keep one slice's float32 logits per
    device under `loss.CHUNK_LOGITS_BYTES`, from how the mesh splits batch, length and vocab."""
    cfg = setup.cfg
    if cfg.model.loss_chunks:
        return cfg.model.loss_chunks
    sizes = sharding.mesh_sizes(setup.mesh)

    def shards(name: str) -> int:
        return math.prod(sizes.get(axis, 1) for axis in setup.rules.get(name, ()))

    t = cfg.data.seq_len
    return auto_chunks(t, rows * t / (shards("batch") * shards("length")),
                       cfg.model.vocab_size / shards("vocab"), shards("length"))


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] taking rows i::k, so every microbatch stays spread over the
    batch shards instead of living on a subset of devices."""
    return {key: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
            for key, x in batch.items()}


def gradients(setup: Setup, params: PyTree, batch: Batch) -> tuple[PyTree, dict]:
    """Gradients of the token-mean loss, accumulated over `train.microbatches` in a scan.

    Summed losses and token counts make k microbatches of b rows give exactly the gradient of
    one batch of k*b rows, however the padding falls.
    """
    k = setup.cfg.train.microbatches
    grad_fn = jax.value_and_grad(lambda p, b: _forward_sums(setup, p, b), has_aux=True)
    with sharding.activation_sharding(setup.mesh, setup.rules):
        if k == 1:
            (_, aux), grads = grad_fn(params, batch)
        else:
            def micro(carry: tuple, mb: Batch) -> tuple[tuple, None]:
                g_acc, aux_acc = carry
                mb = {key: sharding.constrain(x, ("batch", "length")) for key, x in mb.items()}
                (_, aux), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, g_acc, g),
                        jax.tree.map(jnp.add, aux_acc, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            aux0 = {"ce_sum": jnp.zeros((), jnp.float32), "tokens": jnp.zeros((), jnp.float32)}
            (grads, aux), _ = jax.lax.scan(micro, (zeros, aux0), _split_microbatches(batch, k))
    tokens = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens.astype(g.dtype), grads)
    return grads, {**aux, "loss": aux["ce_sum"] / tokens}


def make_train_step(setup: Setup) -> Callable[[PyTree, Batch], tuple[PyTree, dict]]:
    cfg = setup.cfg
    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)

    def step(state: PyTree, batch: Batch) -> tuple[PyTree, dict]:
        params = state["params"]
        grads, aux = gradients(setup, params, batch)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        loss = aux["loss"]
        updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step leaves the state as it was; the loop stops at the next log step.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 {**state, "step": new_state["step"]})
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": aux["tokens"], "finite": finite}
        return new_state, metrics

    compiled = jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_shardings()),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
        compiler_options=platform.compiler_options(setup.mesh),
    )
    return platform.synchronous_on_cpu(compiled, setup.mesh)


def make_eval_step(setup: Setup) -> Callable[[PyTree, Batch], dict]:
    def step(params: PyTree, batch: Batch) -> dict:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            _, aux = _forward_sums(setup, params, batch)
        return aux

    compiled = jax.jit(step, in_shardings=(setup.state_shardings["params"],
                                           setup.batch_shardings()),
                       out_shardings=sharding.replicated(setup.mesh))
    return platform.synchronous_on_cpu(compiled, setup.mesh)


def evaluate(eval_step: Callable, params: PyTree, batches: Iterator[Batch],
             bytes_per_token: float | None = None) -> dict[str, float]:
    """Token-weighted mean loss over the batches; bits per byte when the text's
    bytes-per-token ratio is known."""
    sums = jax.device_get([eval_step(params, b) for b in batches])
    ce = sum(float(s["ce_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    loss = ce / max(tokens, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if bytes_per_token:
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return result


def check_finite(step: int, finite_flags: list[Any]) -> None:
    bad = [step - len(finite_flags) + 1 + i for i, ok in enumerate(finite_flags) if not ok]
    if bad:
        raise NonFiniteLoss(
            f"loss became NaN/Inf at step {bad[0]}; stopping (the state keeps the last finite "
            f"step and no checkpoint is written after it)"
        )
