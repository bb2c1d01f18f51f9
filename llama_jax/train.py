"""Train state, the compiled train and eval steps, and the training loop.

The state is a plain pytree {"step", "params", "opt_state"} of pure dicts (no NNX objects), so
jit, Orbax and HF conversion all see ordinary arrays. The NNX graph is split once; each traced
step merges it with the params, which costs nothing at run time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax import flops, sharding
from llama_jax.checkpoint import Checkpointer, CheckpointError, resolve, restore_latest_good
from llama_jax.config import Config, save_config
from llama_jax.data.batch import BATCH_KEYS, to_global
from llama_jax.errors import LlamaJaxError
from llama_jax.loss import head_loss_sums, loss_sums
from llama_jax.model import Transformer
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.run_dir import check_resume, locked
from llama_jax.storage import (
    Appender,
    as_path,
    ensure_dir,
    is_remote,
    replace_text,
    upload_tree,
)

if TYPE_CHECKING:  # the data pipeline imports TFDS: only runs with real data pay for it
    from llama_jax.data.pipeline import PreparedData

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
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(cfg.train.seed)))
    graphdef, abstract_vars = nnx.split(abstract)
    param_shardings = nnx.to_pure_dict(
        sharding.state_shardings(abstract_vars, mesh, cfg.mesh.rules)
    )
    abstract_params = nnx.to_pure_dict(abstract_vars)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
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
    # Synthetic rows hold one sequence each: no document mask, so fused attention kernels
    # (cuDNN) run their plain causal path.
    cfg = setup.cfg
    packed = cfg.data.dataset != "synthetic"
    args = (batch["inputs"], batch["positions"], batch["segment_ids"] if packed else None)
    if not cfg.train.fused_loss:
        return loss_sums(model(*args), batch["targets"], batch["weights"], cfg.train.z_loss)
    x = model.final_norm(model.hidden_states(*args))
    return head_loss_sums(x, model.head_weight(x.dtype), batch["targets"], batch["weights"],
                          cfg.train.z_loss)


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


# XLA:CPU options for the training step, each measured (docs/performance.md).
CPU_COMPILER_OPTIONS = {
    # Copy insertion by region analysis (XLA's GPU default): fewer copies of the stacked
    # per-layer buffers that a scanned layer loop carries.
    "xla_cpu_copy_insertion_use_region_analysis": True,
}


@functools.cache
def _options_accepted(device: jax.Device) -> bool:
    """Whether this jaxlib knows the options: an unknown name fails every compile."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jax.device_put(np.zeros((), np.float32), device)).compile()
    except Exception:  # noqa: BLE001 - XLA's INVALID_ARGUMENT ("No such compile option")
        return False
    return True


def compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    device = mesh.devices.flat[0]
    if device.platform == "cpu" and _options_accepted(device):
        return CPU_COMPILER_OPTIONS
    return None


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
        compiler_options=compiler_options(setup.mesh),
    )
    return sharding.synchronous_on_cpu(compiled, setup.mesh)


def make_eval_step(setup: Setup) -> Callable[[PyTree, Batch], dict]:
    def step(params: PyTree, batch: Batch) -> dict:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            _, aux = _forward_sums(setup, params, batch)
        return aux

    compiled = jax.jit(step, in_shardings=(setup.state_shardings["params"],
                                           setup.batch_shardings()),
                       out_shardings=sharding.replicated(setup.mesh))
    return sharding.synchronous_on_cpu(compiled, setup.mesh)


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


# ---------------------------------------------------------------------------------------------
# Data


def make_source(cfg: Config, data: PreparedData | None, split: str, rows: int, seed: int,
                shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of `rows` rows per step from `split` ('train' or 'validation')."""
    if data is None:
        from llama_jax.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, rows, seed, split,
                               jax.process_index(), jax.process_count())
    from llama_jax.data.pipeline import TextPipeline

    return TextPipeline(cfg, data, split, rows // jax.process_count(), seed, shuffle=shuffle)


def prepare(cfg: Config) -> PreparedData | None:
    """The dataset and tokenizer of the config (None for synthetic tokens)."""
    if cfg.data.dataset == "synthetic":
        return None
    from llama_jax.data.pipeline import prepare_data

    return prepare_data(cfg)


def global_batches(setup: Setup, source: Iterator[dict[str, np.ndarray]], rows: int
                   ) -> Iterator[Batch]:
    for local in source:
        yield to_global(local, setup.mesh, setup.rules, rows)


def eval_batches(setup: Setup, data: PreparedData | None, split: str = "validation",
                 count: int | None = None) -> list[Batch]:
    """The first `count` batches of a split, unshuffled: the same every time they are made."""
    cfg = setup.cfg
    rows = cfg.train.global_batch_size
    source = make_source(cfg, data, split, rows, cfg.train.seed, shuffle=False)
    it = global_batches(setup, source, rows)
    batches = [next(it) for _ in range(count or cfg.train.eval_batches)]
    getattr(source, "close", lambda: None)()
    return batches


# ---------------------------------------------------------------------------------------------
# The loop


class MetricsWriter:
    """metrics.jsonl plus TensorBoard scalars; only process 0 writes.

    On resume from step N, rows after N (written by the run that was interrupted) are dropped
    so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: epath.Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            if self.path.is_file():
                self._keep_through(resume_step)
            self.rows = Appender(self.path)
            self.tb = SummaryWriter(os.fspath(run_dir / "tb"), purge_step=resume_step + 1)

    def _keep_through(self, resume_step: int) -> None:
        """Drop rows after `resume_step`, and a torn last line (a crash mid-write)."""
        kept = []
        lines = self.path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    print(f"note: dropping a torn last line of {self.path} (a write cut short)",
                          file=sys.stderr)
                    continue
                raise LlamaJaxError(f"{self.path}: line {i + 1} is not JSON; fix or move the "
                                    f"file to resume") from None
            if row.get("step", 0) <= resume_step:
                kept.append(line)
        new_text = "".join(f"{line}\n" for line in kept)
        if new_text != self.path.read_text():
            replace_text(self.path, new_text)

    def write(self, row: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.rows.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(f"{prefix}/{key}", value, row["step"])
        if not self.rows.remote:  # on GCS each flush uploads the whole event file again
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.rows.flush()
            self.tb.close()


@dataclass
class TrainResult:
    state: PyTree
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]


class Preempted(LlamaJaxError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _StopSignals:
    """Turns SIGTERM (a preemption notice) and a first SIGINT (Ctrl-C) into a flag the loop
    polls between steps, so either ends the run with a checkpoint of the step reached; a
    second Ctrl-C interrupts at once, as users expect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.received is not None

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def stopped(self, step: int, where: epath.Path) -> Preempted:
        name = signal.Signals(self.received).name
        return Preempted(f"stopped by {name} after step {step}; checkpoint saved in {where}",
                         128 + int(self.received))

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _initial_state(cfg: Config, setup: Setup, ckpt: Checkpointer, source: Any
                   ) -> tuple[PyTree, int]:
    """Resume from this run's newest good checkpoint, else start from `restore_from`, else
    initialise. Returns the state and the step it is at."""
    restored = restore_latest_good(ckpt, setup.abstract_state)
    if restored is not None:
        state, data_state, meta = restored
        if data_state and hasattr(source, "set_state"):
            source.set_state(data_state)
        if jax.process_index() == 0:
            print(f"resuming from {ckpt.directory / str(meta['step'])}", file=sys.stderr)
        return state, int(meta["step"])
    if ckpt.steps() or ckpt.incomplete():
        print(f"warning: no usable checkpoint in {ckpt.directory}; starting afresh",
              file=sys.stderr)
    origin = cfg.checkpoint.restore_from
    if not origin:
        return init_state(setup), 0
    where = resolve(origin)
    other = Checkpointer(cfg, where.directory, read_only=True)
    step = where.step if where.step is not None else (other.steps() or [None])[-1]
    if step is None:
        raise CheckpointError(f"checkpoint.restore_from: no complete checkpoint in {origin}")
    params_only = cfg.checkpoint.restore_params_only
    loaded, _, _ = other.restore(step, setup.abstract_state, params_only=params_only)
    if not params_only:
        return loaded, int(loaded["step"])
    fresh = init_state(setup)
    fresh["params"] = loaded["params"]
    return fresh, 0


def train(cfg: Config, mesh: Mesh | None = None, quiet: bool = False) -> TrainResult:
    """Run (or resume) `cfg.train.steps` steps: log every `log_every`, evaluate every
    `eval_every`, checkpoint every `checkpoint.every`, at the end and on SIGTERM/SIGINT.

    Nothing in the run directory is written until the run has really started (the config
    fits the saved state, the mesh fits the devices, the state is restored or initialised),
    and only while this process holds the directory's lock (process 0 of a multi-host run).
    """
    run_dir = as_path(cfg.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        ensure_dir(run_dir)
    with locked(run_dir, enabled=is_main):
        return _train_locked(cfg, run_dir, mesh, quiet)


def _train_locked(cfg: Config, run_dir: epath.Path, mesh: Mesh | None, quiet: bool) -> TrainResult:
    is_main = jax.process_index() == 0
    applied = check_resume(run_dir, cfg)
    data = prepare(cfg)
    setup = make_setup(cfg, mesh)
    rows = cfg.train.global_batch_size
    source = make_source(cfg, data, "train", rows, cfg.train.seed)
    ckpt = Checkpointer(cfg, run_dir / "checkpoints")
    state, first_step = _initial_state(cfg, setup, ckpt, source)
    if is_main:
        if applied:
            print(f"resuming with changed settings: {'; '.join(applied)}", file=sys.stderr)
        save_config(cfg, run_dir / "config.yaml")
    if data is not None:
        from llama_jax.data.pipeline import copy_tokenizer

        copy_tokenizer(data, run_dir)
    train_step, eval_step = make_train_step(setup), make_eval_step(setup)
    batches = global_batches(setup, source, rows)
    val = eval_batches(setup, data)
    bytes_per_token = data.bytes_per_token["validation"] if data else None
    fpt = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    peak, _ = flops.platform_peak_flops(list(setup.mesh.devices.flat))
    writer = MetricsWriter(run_dir, resume_step=first_step)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []
    total = cfg.train.steps
    progress = _progress(quiet or not is_main)
    task = progress.add_task("train", total=total, completed=first_step, stats="compiling")
    t_last, step_last = None, first_step
    saved_step = first_step if first_step in ckpt.steps() else -1

    def run_eval(step: int) -> None:
        result = {"step": step, **evaluate(eval_step, state["params"], iter(val),
                                           bytes_per_token)}
        evals.append(result)
        writer.write({k: v for k, v in result.items() if k != "tokens"}, prefix="eval")
        if is_main and not quiet:
            progress.console.print(f"step {step}: validation loss {result['loss']:.4f} "
                                   f"({result['tokens']:,.0f} tokens)")

    def save(step: int) -> None:
        nonlocal saved_step
        _check_finite(step, jax.device_get([m["finite"] for m in pending]))
        ckpt.save(step, state, source.get_state() if hasattr(source, "get_state") else None)
        saved_step = step

    profiler = Profiler(cfg, run_dir)
    try:
        with progress, _StopSignals() as stop:
            if first_step == 0:
                run_eval(0)
            for step in range(first_step + 1, total + 1):
                profiler.at(step)
                state, metrics = train_step(state, next(batches))
                pending.append(metrics)
                if t_last is None:  # throughput is timed from the end of the compiled step
                    jax.block_until_ready(state["step"])
                    t_last, step_last = time.perf_counter(), step
                if step % cfg.train.log_every == 0 or step == total:
                    host = jax.device_get(pending)
                    now = time.perf_counter()
                    row = _log_row(step, host, now - t_last, step - step_last,
                                   rows * cfg.data.seq_len, fpt, peak)
                    t_last, step_last = now, step
                    pending.clear()
                    history.append(row)
                    writer.write(row)
                    speed = "" if row["tokens_per_sec"] is None else (
                        f"  {row['tokens_per_sec']:,.0f} tok/s  MFU {row['mfu']:.1%}")
                    progress.update(task, completed=step, stats=f"loss {row['loss']:.4f}{speed}")
                every = cfg.checkpoint.every
                if (every and step % every == 0) or step == total or stop.raised:
                    save(step)
                if stop.raised:
                    ckpt.wait()
                    raise stop.stopped(step, ckpt.directory / str(step))
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
                    run_eval(step)
            profiler.close()
            if saved_step != total:
                save(total)
            run_eval(total)
    except BaseException:
        # The error already on its way out is the one to report; a save that also fails
        # while closing adds nothing.
        with contextlib.suppress(Exception):
            ckpt.close()
        raise
    else:
        ckpt.close()
    finally:
        with contextlib.suppress(Exception):
            writer.close()
        getattr(source, "close", lambda: None)()
    return TrainResult(state, history, evals)


def _check_finite(step: int, finite_flags: list[Any]) -> None:
    bad = [step - len(finite_flags) + 1 + i for i, ok in enumerate(finite_flags) if not ok]
    if bad:
        raise NonFiniteLoss(
            f"loss became NaN/Inf at step {bad[0]}; stopping (the state keeps the last finite "
            f"step and no checkpoint is written after it)"
        )


def _log_row(step: int, host: list[dict], seconds: float, steps: int, tokens_per_step: int,
             fpt: float, peak: float) -> dict[str, Any]:
    _check_finite(step, [m["finite"] for m in host])
    tps = tokens_per_step * steps / seconds if steps and seconds > 0 else None
    return {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in host])),
        "grad_norm": float(host[-1]["grad_norm"]),
        "lr": float(host[-1]["lr"]),
        "tokens_per_sec": tps,
        "step_time_s": seconds / steps if steps else None,
        "mfu": None if tps is None else flops.mfu(tps, fpt, peak),
    }


class Profiler:
    """A JAX profiler trace of steps [profile_start, profile_start + profile_steps), in
    RUN_DIR/profile (on an object store: traced into a local folder, then copied up)."""

    def __init__(self, cfg: Config, run_dir: epath.Path):
        self.start = cfg.train.profile_start
        self.stop = self.start + cfg.train.profile_steps
        self.enabled = cfg.train.profile_steps > 0
        self.path = run_dir / "profile"
        self.local: str | None = None
        self.active = False

    def at(self, step: int) -> None:
        if self.enabled and step == self.start and not self.active:
            if is_remote(self.path):
                import tempfile

                self.local = tempfile.mkdtemp(prefix="llama_jax_profile_")
            jax.profiler.start_trace(self.local or os.fspath(self.path))
            self.active = True
        elif self.active and step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self.local:
                upload_tree(epath.Path(self.local), self.path)


def _progress(disabled: bool):  # noqa: ANN202 - rich Progress
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), disable=disabled)
