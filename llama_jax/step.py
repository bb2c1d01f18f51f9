"""The train state and its shardings, the loss and its gradients, the compiled train and eval
steps.

The state is a plain pytree {"step", "params", "opt_state", "loss_scale", "nonfinite"} (and
"fp8", the amax histories, under delayed fp8 scaling) of pure dicts (no NNX objects), so jit,
Orbax and HF conversion all see ordinary arrays. The NNX graph is split once; each traced step
merges it with the params, which costs nothing at run time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax import context_parallel, fp8, platform, sharding
from llama_jax.config import Config
from llama_jax.data.batch import BATCH_KEYS
from llama_jax.data.feed import source_kind
from llama_jax.errors import ConfigError
from llama_jax.layers import metadata_mask
from llama_jax.loss import auto_chunks, chunked_head_loss_sums, head_loss_sums, loss_sums
from llama_jax.model import OFFLOAD_POLICIES, Transformer, fp8_projections
from llama_jax.ops import HeadProduct
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer
from llama_jax.precision import NEVER, LossScale

PyTree = Any
Batch = dict[str, jax.Array]


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
    compute_cast: PyTree  # per parameter: read only in the compute dtype (its metadata)

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
    # A non-finite gradient is dropped whole: parameters and moments stay as they were.
    tx = optax.apply_if_finite(
        make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(abstract_vars)), NEVER)
    abstract_params = nnx.to_pure_dict(abstract_vars)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    placed = sharding.train_state_shardings(abstract_vars, tx, abstract_opt, mesh, cfg.mesh.rules)
    opt_shardings = _split(placed["opt_state"])[0]
    extras = jax.eval_shape(lambda: fresh_entries(cfg))
    shardings = {**placed, "opt_state": opt_shardings,
                 **jax.tree.map(lambda _: sharding.replicated(mesh), extras)}
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                      "opt_state": _split(abstract_opt)[0], **extras}
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    warn_replicated(cfg, abstract_vars, mesh)
    return Setup(cfg, mesh, graphdef, tx, shardings, abstract_state,
                 metadata_mask(abstract_vars, "compute_cast", False))


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
                "opt_state": _split(setup.tx.init(params))[0], **fresh_entries(cfg)}

    return jax.block_until_ready(jax.jit(init, out_shardings=setup.state_shardings)())


def fresh_entries(cfg: Config) -> dict[str, PyTree]:
    """The state's entries beside step, params and opt_state: the loss scale and the counters
    of skipped steps (optax.apply_if_finite's), as a run starts them; under delayed fp8
    scaling, empty amax histories."""
    entries = {"loss_scale": LossScale.from_config(cfg).initial(),
               "nonfinite": {"notfinite_count": jnp.zeros((), jnp.int32),
                             "last_finite": jnp.ones((), jnp.bool_),
                             "total_notfinite": jnp.zeros((), jnp.int32)}}
    if cfg.model.fp8_scaling == "delayed":
        entries["fp8"] = fp8.empty_history(fp8_projections(cfg.model), cfg.model.num_layers,
                                           cfg.model.fp8_amax_history)
    return entries


def completed(setup: Setup, restored: PyTree) -> PyTree:
    """A restored state made whole for this run: entries its checkpoint predates (written
    before loss scaling) start fresh, and a loss scale the config no longer asks for is reset
    (precision.LossScale.reconcile)."""
    missing = [key for key in setup.abstract_state if key not in restored]
    if missing:
        fresh = jax.jit(lambda: {k: fresh_entries(setup.cfg)[k] for k in missing},
                        out_shardings={k: setup.state_shardings[k] for k in missing})()
        restored = {**restored, **fresh}
    restored["loss_scale"] = LossScale.from_config(setup.cfg).reconcile(restored["loss_scale"])
    return restored


_COUNTERS = ("notfinite_count", "last_finite", "total_notfinite")


def _split(opt: optax.ApplyIfFiniteState) -> tuple[PyTree, dict[str, Any]]:
    """apply_if_finite's state as two entries of the train state: the optimizer's own state
    ("opt_state", laid out as in checkpoints from before non-finite steps were skipped) and
    the skip counters ("nonfinite")."""
    return opt.inner_state, {name: getattr(opt, name) for name in _COUNTERS}


def _joined(inner: PyTree, counters: dict[str, Any]) -> optax.ApplyIfFiniteState:
    return optax.ApplyIfFiniteState(inner_state=inner, **counters)


# ---------------------------------------------------------------------------------------------
# Steps


def _forward_sums(setup: Setup, params: PyTree, batch: Batch,
                  scales: fp8.LayerScales | None = None) -> tuple[jax.Array, dict]:
    loss_of, batch = _forward(setup, params, batch, scales)
    return loss_of(batch["weights"])


def _forward(setup: Setup, params: PyTree, batch: Batch, scales: fp8.LayerScales | None = None
             ) -> tuple[Callable[[jax.Array], tuple[jax.Array, dict]], Batch]:
    """The model's forward pass, and the loss sums it gives for any token weights (so
    evaluation can weigh the same forward pass several ways); the batch in the order the
    model saw it. `scales`: delayed fp8 scales of every layer (without them fp8 matmuls scale
    by current amaxes, as evaluation does)."""
    model = nnx.merge(setup.graphdef, params)
    cfg = setup.cfg
    shards = context_parallel.sequence_shards(setup.mesh, setup.rules)
    if shards > 1:  # every device a front and a back chunk: causal work balanced
        order = jnp.asarray(context_parallel.balanced_order(batch["inputs"].shape[1], shards))
        batch = {key: sharding.constrain(x[:, order], ("batch", "length"))
                 for key, x in batch.items()}
    packed = source_kind(cfg).packed
    args = (batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None)
    targets, z_loss = batch["targets"], cfg.train.z_loss
    if not cfg.train.fused_loss:
        logits = model(*args, fp8=scales)
        return (lambda weights: loss_sums(logits, targets, weights, z_loss)), batch
    x = model.final_norm(model.hidden_states(*args, fp8=scales))
    w, product = model.head_weight(x.dtype), HeadProduct.of(cfg.model)
    chunks = loss_chunks(setup, x.shape[0])
    if chunks == 1:
        return (lambda weights: head_loss_sums(x, w, targets, weights, z_loss, product)), batch
    return (lambda weights: chunked_head_loss_sums(x, w, targets, weights, z_loss, chunks,
                                                   product)), batch


def loss_chunks(setup: Setup, rows: int) -> int:
    """`model.loss_chunks`, or when 0 the slices that keep one slice's logits (in
    model.logits_dtype) per device under `loss.CHUNK_LOGITS_BYTES`, from how the mesh splits
    batch, length and vocab."""
    cfg = setup.cfg
    if cfg.model.loss_chunks:
        return cfg.model.loss_chunks
    sizes = sharding.mesh_sizes(setup.mesh)

    def shards(name: str) -> int:
        return math.prod(sizes.get(axis, 1) for axis in setup.rules.get(name, ()))

    t = cfg.data.seq_len
    return auto_chunks(t, rows * t / (shards("batch") * shards("length")),
                       cfg.model.vocab_size / shards("vocab"), shards("length"),
                       jnp.dtype(cfg.model.logits_dtype).itemsize)


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] taking rows i::k, so every microbatch stays spread over the
    batch shards instead of living on a subset of devices."""
    return {key: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
            for key, x in batch.items()}


def gradients(setup: Setup, params: PyTree, batch: Batch, loss_scale: jax.Array | float = 1.0,
              scales: fp8.LayerScales | None = None) -> tuple[PyTree, dict]:
    """Gradients of the token-mean loss, accumulated over `train.microbatches` in a scan.

    The backward starts from `loss_scale / tokens` (tokens counted over the whole batch before
    the forward), so the gradients flowing through float16 activations are those of the mean
    loss times the scale (precision.py); they are divided by the scale again in float32.
    Summed losses make k microbatches of b rows give exactly the gradient of one batch of k*b
    rows, however the padding falls. When the loss is not finite the gradients are NaN too, so
    one finiteness check of the gradients covers both.

    With delayed fp8 `scales`, the amaxes the step observed come back as `fp8_amax` (the
    scales' "gradient", fp8.py), the largest over the microbatches.

    The weights are cast to the compute dtype once, before the forward, and differentiated
    there; each gradient is cast back to its parameter's dtype (what the cast's own transpose
    did: the same numbers). Why: cast inside the layers, a remat policy cast every weight
    again in the backward and each microbatch cast them twice more (4.4 GB of float32 reads
    per pass for the 1B); cast here, the compute-dtype copies (sharded as the weights are)
    are what the layers gather and the backward keeps.
    """
    k = setup.cfg.train.microbatches
    tokens = jnp.maximum(batch["weights"].sum(), 1.0)
    seed = (loss_scale / tokens).astype(jnp.float32)
    compute = jnp.dtype(setup.cfg.model.compute_dtype)
    cast = jax.tree.map(lambda p, c: p.astype(compute) if c else p, params, setup.compute_cast)

    def scaled(p: PyTree, s: fp8.LayerScales | None, b: Batch) -> tuple[jax.Array, dict]:
        total, aux = _forward_sums(setup, p, b, s)
        return total * seed, {**aux, "total": total}

    def grad_fn(s: fp8.LayerScales | None, b: Batch) -> tuple[tuple, tuple[PyTree, PyTree]]:
        out, (g, amax) = jax.value_and_grad(scaled, argnums=(0, 1), has_aux=True)(cast, s, b)
        return out, (jax.tree.map(lambda g, p: g.astype(p.dtype), g, params), amax)

    with sharding.activation_sharding(setup.mesh, setup.rules):
        if k == 1:
            (_, aux), (grads, amax) = grad_fn(scales, batch)
        else:
            def micro(carry: tuple, mb: Batch) -> tuple[tuple, None]:
                g_acc, amax_acc, aux_acc = carry
                mb = {key: sharding.constrain(x, ("batch", "length")) for key, x in mb.items()}
                (_, aux), (g, amax) = grad_fn(scales, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.maximum, amax_acc, amax),
                        jax.tree.map(jnp.add, aux_acc, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, (params, scales))
            aux0 = {key: jnp.zeros((), jnp.float32) for key in ("ce_sum", "tokens", "total")}
            (grads, amax, aux), _ = jax.lax.scan(micro, (*zeros, aux0),
                                                 _split_microbatches(batch, k))
    loss = aux["ce_sum"] / tokens
    unscale = jnp.where(jnp.isfinite(loss), 1.0 / loss_scale, jnp.nan).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g * unscale.astype(g.dtype), grads)
    out = {"ce_sum": aux["ce_sum"], "tokens": aux["tokens"], "loss": loss,
           "z_loss": (aux["total"] - aux["ce_sum"]) / tokens}
    if scales is not None:
        out["fp8_amax"] = amax.values
    return grads, out


def make_train_step(setup: Setup) -> Callable[[PyTree, Batch], tuple[PyTree, dict]]:
    """One optimizer step. A step whose loss or gradients are not finite changes neither the
    parameters nor the optimizer state (optax.apply_if_finite), only the step count, the
    skipped-step count and the loss scale; what the run then does is `train.on_nonfinite`'s
    decision, taken on the host (train.py)."""
    cfg = setup.cfg
    schedule = lr_schedule(cfg.optimizer, cfg.train.steps)
    scaler = LossScale.from_config(cfg)

    def step(state: PyTree, batch: Batch) -> tuple[PyTree, dict]:
        params, scale_state = state["params"], state["loss_scale"]
        history = state.get("fp8")
        scales = None if history is None else fp8.scales_from(history, cfg.model.fp8_gradients)
        grads, aux = gradients(setup, params, batch, scale_state["scale"], scales)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, new_opt = setup.tx.update(
            grads, _joined(state["opt_state"], state["nonfinite"]), params)
        inner, counters = _split(new_opt)
        finite = new_opt.last_finite
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": inner, "nonfinite": counters,
                     "loss_scale": scaler.update(scale_state, finite)}
        if history is not None:  # a skipped step leaves the histories as they were
            observed = fp8.recorded(history, aux["fp8_amax"])
            new_state["fp8"] = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                            observed, history)
        metrics = {
            "loss": aux["loss"], "grad_norm": grad_norm, "tokens": aux["tokens"],
            "z_loss": aux["z_loss"],
            # The schedule advances with applied updates only, as optax's own count does.
            "lr": schedule(state["step"] - state["nonfinite"]["total_notfinite"]),
            "finite": finite, "loss_finite": jnp.isfinite(aux["loss"]),
            "absorbed": scaler.absorbs(scale_state), "loss_scale": scale_state["scale"],
            "skipped_steps": new_opt.total_notfinite,
        }
        if source_kind(cfg).packed:  # how full rows get: model.max_segments_per_row's bound
            # Documents start where positions restart (data/batch.py's model_row): a sum along
            # the row, which stays an all-reduce where `mesh.sequence` splits it; the runs'
            # cumulative sum (ops.segment_runs) became an all-to-all there, which deadlocked
            # XLA:CPU's collectives beside ring attention's permutes.
            metrics["documents_per_row"] = jnp.max(jnp.sum(batch["positions"] == 0, axis=1))
        return new_state, metrics

    compiled = jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_shardings()),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=(0,),
        compiler_options=platform.compiler_options(setup.mesh),
    )
    return platform.synchronous_on_cpu(compiled, setup.mesh)


def make_fp8_calibration(setup: Setup) -> Callable[[PyTree, Batch], PyTree] | None:
    """Under delayed fp8 scaling, the state with its amax histories begun from one batch
    measured with current scaling (nothing else changes); None otherwise.

    Why: an empty history has no scale to give. Scale 1 would flush the output gradients
    (about 1e-6 after the token mean) to zero in fp8 and make the first update meaningless;
    the first batch's own amaxes are the scales current scaling would have used. The train
    loop calls it for a state whose histories are empty (`fp8.is_empty`): a fresh start, a
    rollback to it, or a resume from a checkpoint written without delayed scaling.
    """
    if "fp8" not in setup.abstract_state:
        return None
    cfg = setup.cfg

    def calibrate(state: PyTree, batch: Batch) -> PyTree:
        scales = fp8.scales_from(state["fp8"], cfg.model.fp8_gradients, current=True)
        _, aux = gradients(setup, state["params"], batch, state["loss_scale"]["scale"], scales)
        return {**state, "fp8": fp8.recorded(state["fp8"], aux["fp8_amax"])}

    compiled = jax.jit(calibrate, in_shardings=(setup.state_shardings, setup.batch_shardings()),
                       out_shardings=setup.state_shardings, donate_argnums=(0,),
                       compiler_options=platform.compiler_options(setup.mesh))
    return platform.synchronous_on_cpu(compiled, setup.mesh)


def make_eval_step(setup: Setup, sources: int = 1) -> Callable[[PyTree, Batch], dict]:
    """Loss sums of a batch; with several `sources` (the batch then has `source`), each
    source's sums too (`ce_by_source`, `tokens_by_source`), from the same forward pass: the
    loss is mapped over one weight mask per source, which leaves the logits computed once."""
    def step(params: PyTree, batch: Batch) -> dict:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            loss_of, batch = _forward(setup, params, batch)
            _, aux = loss_of(batch["weights"])
            if sources > 1:
                masks = batch["weights"] * (batch["source"][None] == jnp.arange(sources)[
                    :, None, None])
                _, each = jax.vmap(loss_of)(masks)
                aux = {**aux, "ce_by_source": each["ce_sum"],
                       "tokens_by_source": each["tokens"]}
        return aux

    shardings = setup.batch_shardings()
    if sources > 1:
        shardings["source"] = shardings["inputs"]
    compiled = jax.jit(step, in_shardings=(setup.state_shardings["params"], shardings),
                       out_shardings=sharding.replicated(setup.mesh))
    return platform.synchronous_on_cpu(compiled, setup.mesh)


def evaluate(eval_step: Callable, params: PyTree, batches: Iterator[Batch],
             bytes_per_token: float | None = None, names: list[str] | None = None
             ) -> dict[str, Any]:
    """Token-weighted mean loss over the batches; bits per byte when the text's
    bytes-per-token ratio is known; with the source `names` of a mixture, each source's
    loss (`loss_by_source`, null for a source with no token in the batches)."""
    sums = jax.device_get([eval_step(params, b) for b in batches])
    ce = sum(float(s["ce_sum"]) for s in sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    loss = ce / max(tokens, 1.0)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                              "tokens": tokens}
    if bytes_per_token:
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    if names and len(names) > 1:
        ce_each = np.sum([s["ce_by_source"] for s in sums], axis=0, dtype=np.float64)
        tokens_each = np.sum([s["tokens_by_source"] for s in sums], axis=0, dtype=np.float64)
        result["loss_by_source"] = {name: float(c / t) if t else None for name, c, t in
                                    zip(names, ce_each, tokens_each, strict=True)}
        result["tokens_by_source"] = {name: float(t) for name, t in
                                      zip(names, tokens_each, strict=True)}
    return result
