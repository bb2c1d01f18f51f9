"""The training loop: restore or initialise, then step, log, evaluate and checkpoint until
`train.steps`, saving on SIGTERM / Ctrl-C. What a step computes lives in `step.py`, where its
batches come from in `data/feed.py`, what it reports in `metrics.py`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
from etils import epath
from jax.sharding import Mesh

from llama_jax import flops, fp8, goodput
from llama_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    config_of,
    resolve,
    restore_latest_good,
)
from llama_jax.compile_cache import CompileLog, KeptStep, describe, persistent_cache
from llama_jax.config import Config, ModelConfig, architecture_differences, save_config
from llama_jax.convert import config_for_hf, hf_folder, read_hf_params
from llama_jax.data.feed import global_batches, make_source, prepare, source_kind
from llama_jax.data.tokenizer import saved_tokenizer
from llama_jax.errors import LlamaJaxError, check_can_write
from llama_jax.evaluate import (
    Evaluator,
    refuse_text_without_weights_tokenizer,
    with_run_tokenizer,
)
from llama_jax.goodput import Clock
from llama_jax.metrics import MetricsWriter, Profiler, StepLog
from llama_jax.precision import NonFiniteStep, on_nonfinite
from llama_jax.run_dir import RunDirError, check_resume, locked
from llama_jax.step import (
    PyTree,
    Setup,
    completed,
    init_state,
    make_fp8_calibration,
    make_setup,
    make_train_step,
)
from llama_jax.stopping import Preempted, StopSignals
from llama_jax.storage import as_path, ensure_dir, is_remote, missing_folders, remove_if_empty
from llama_jax.watchdog import Watchdog


@dataclass
class TrainResult:
    state: PyTree
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]


class Start(NamedTuple):
    """The state a session begins from, its step, and where it came from (None: initialised),
    `resumed` when that is this run's own checkpoint."""

    state: PyTree
    step: int
    origin: Any
    resumed: bool


def _initial_state(cfg: Config, setup: Setup, ckpt: Checkpointer, source: Any) -> Start:
    """Resume from this run's newest good checkpoint, else start from `restore_from`, else
    initialise."""
    restored = restore_latest_good(ckpt, setup.abstract_state)
    if restored is not None:
        state, data_state, meta = restored
        if data_state and hasattr(source, "set_state"):
            source.set_state(data_state)
        step = int(meta["step"])
        return Start(completed(setup, state), step, ckpt.directory / str(step), True)
    if ckpt.steps() or ckpt.incomplete():
        print(f"warning: no usable checkpoint in {ckpt.directory}; starting afresh",
              file=sys.stderr)
    origin = cfg.checkpoint.restore_from
    if not origin:
        return Start(init_state(setup), 0, None, False)
    params_only = cfg.checkpoint.restore_params_only
    folder = hf_folder(origin)
    if folder is not None:  # restore_params_only: checked by _weights_tokenizer
        _note_architecture(origin, config_for_hf(folder, folder, None).model, cfg)
        fresh = init_state(setup)
        fresh["params"] = read_hf_params(folder, cfg.model, setup.abstract_state["params"])
        return Start(fresh, 0, folder, False)
    where = resolve(origin)
    other = Checkpointer(cfg, where.directory, read_only=True)
    step = where.pick(other.steps())
    if step is None:
        raise CheckpointError(f"checkpoint.restore_from: no complete checkpoint in {origin}")
    _note_architecture(origin, config_of(origin, step).model, cfg)
    loaded, _, _ = other.restore(step, setup.abstract_state, params_only=params_only)
    if not params_only:
        return Start(completed(setup, loaded), int(loaded["step"]), where.directory / str(step),
                     False)
    fresh = init_state(setup)
    fresh["params"] = loaded["params"]
    return Start(fresh, 0, where.directory / str(step), False)


def _note_architecture(origin: str, source: ModelConfig, cfg: Config) -> None:
    """Say which architecture settings differ from the weights' own: a changed shape is
    refused by the restore, but a changed RoPE base, norm epsilon or activation would load
    and compute another function without a word (sometimes on purpose: a longer context's
    RoPE base)."""
    changed = architecture_differences(source, cfg.model)
    if changed and jax.process_index() == 0:
        print(f"note: checkpoint.restore_from={origin}: this run's model differs from the one "
              f"its weights were trained as: {'; '.join(changed)}", file=sys.stderr)


def _weights_tokenizer(cfg: Config, run_dir: epath.Path) -> Config:
    """The tokenizer the weights were trained with: `data.tokenizer` when set; else this run's
    copy (a resume keeps the one it began with, even if the data cache that held it is gone
    or was rebuilt differently); else, for a run starting from `checkpoint.restore_from`,
    that run's copy or the HF folder's tokenizer. A tokenizer trained afresh on this
    run's corpus would give the restored embedding rows other pieces' ids."""
    origin = cfg.checkpoint.restore_from
    folder = hf_folder(origin) if origin else None
    if folder is not None and not cfg.checkpoint.restore_params_only:  # before data is read
        raise CheckpointError(f"checkpoint.restore_from={origin} is an HF folder: weights "
                              f"only, no optimizer state or step; set "
                              f"checkpoint.restore_params_only=true to begin at step 0 with "
                              f"them")
    if cfg.data.tokenizer or not source_kind(cfg).text:
        return cfg
    own = with_run_tokenizer(cfg, run_dir)
    if own.data.tokenizer or not origin:
        return own
    try:
        source = folder if folder is not None else resolve(origin).directory.parent
    except CheckpointError:  # said by the restore, if this run is not a resume
        return cfg
    saved = saved_tokenizer(source)
    if saved is not None:
        if jax.process_index() == 0:
            print(f"note: tokenizing with {saved}, the tokenizer of "
                  f"checkpoint.restore_from's weights (data.tokenizer=PATH chooses another)",
                  file=sys.stderr)
        return with_run_tokenizer(cfg, source)
    refuse_text_without_weights_tokenizer(cfg, origin, f"checkpoint.restore_from={origin}")
    return cfg


def _check_not_past(cfg: Config, start: Start) -> None:
    """Refuse a `train.steps` below the step the state is at, before anything is written: the
    loop would not run and the final save would label the newer state with the older step."""
    if start.step <= cfg.train.steps:
        return
    other = "start a new run_dir with checkpoint.restore_from=DIR/STEP" if start.resumed else \
        "set checkpoint.restore_params_only=true to begin at step 0 with its weights"
    raise RunDirError(
        f"train.steps={cfg.train.steps} is behind the state this run starts from (step "
        f"{start.step}, {start.origin}): a run cannot go back. Nothing was changed; raise "
        f"train.steps, or {other}")


def train(cfg: Config, mesh: Mesh | None = None, quiet: bool = False,
          started: float | None = None) -> TrainResult:
    """Run (or resume) `cfg.train.steps` steps: log every `log_every`, evaluate every
    `eval_every`, checkpoint every `checkpoint.every`, at the end and on SIGTERM/SIGINT.

    Nothing in the run directory is written until the run has really started (the config
    fits the saved state, the mesh fits the devices, the state is restored or initialised),
    and only while this process holds the directory's lock (process 0 of a multi-host run).
    `started` (a `time.time()`, default now) is when this session began, for goodput.
    """
    started = started or time.time()
    run_dir = as_path(cfg.run_dir)
    is_main = jax.process_index() == 0
    tasks = _task_manager(cfg)  # a missing extra or a wrong task name: before anything is written
    made = missing_folders(run_dir / "checkpoints") if is_main else []  # Orbax makes the last
    if is_main:
        if not is_remote(run_dir):
            check_can_write(run_dir, "run_dir")  # a file in its place: one line, not EEXIST
        ensure_dir(run_dir)
    session = goodput.next_session(run_dir / "metrics.jsonl") if is_main else 0
    try:
        with locked(run_dir, enabled=is_main), \
                persistent_cache(cfg.train.compilation_cache_dir, is_main) as cache_dir, \
                Watchdog(run_dir, jax.process_index(), cfg.train.step_timeout_s) as dog:
            return _train_locked(cfg, run_dir, mesh, quiet, Clock(session, 0, started), dog,
                                 cache_dir, tasks)
    except BaseException:
        # A new run refused before it wrote anything leaves no empty folders behind; the
        # error on its way out is the one to report.
        with contextlib.suppress(Exception):
            remove_if_empty(made)
        raise


def _task_manager(cfg: Config) -> Any:
    """lm-eval's task index when `train.eval_tasks` names tasks (harness.py), else None."""
    if not cfg.train.eval_tasks:
        return None
    if not source_kind(cfg).text:
        raise LlamaJaxError("train.eval_tasks: this run reads token ids, not text, and "
                            "lm-eval's tasks are text")
    from llama_jax.harness import task_manager

    return task_manager(list(cfg.train.eval_tasks), cfg.train.eval_tasks_include_path)


def _train_locked(cfg: Config, run_dir: epath.Path, mesh: Mesh | None, quiet: bool,
                  clock: Clock, dog: Watchdog, cache_dir: str, task_index: Any) -> TrainResult:
    """The loop only sequences; each collaborator decides for itself when it acts: the step
    log when to fetch and write a row, the evaluator when to run, the checkpointer when a save
    is due (the last step and a stop signal always save). `dog.doing` and `clock.enter` mark
    each change of activity, for the hang watchdog and for goodput."""
    is_main = jax.process_index() == 0
    applied = check_resume(run_dir, cfg)
    data = prepare(_weights_tokenizer(cfg, run_dir))
    setup = make_setup(cfg, mesh)
    rows = cfg.train.global_batch_size
    source = make_source(cfg, data, "train", rows, cfg.train.seed)
    ckpt = Checkpointer(cfg, run_dir / "checkpoints")
    clock.enter("restore")
    dog.doing(0, "restoring or initialising the state")
    start = _initial_state(cfg, setup, ckpt, source)
    _check_not_past(cfg, start)
    state, first_step = start.state, start.step
    clock.first_step = first_step
    clock.enter("startup")
    if is_main:
        if start.resumed:
            print(f"resuming from {start.origin}", file=sys.stderr)
        if applied:
            print(f"resuming with changed settings: {'; '.join(applied)}", file=sys.stderr)
        save_config(cfg, run_dir / "config.yaml")
    if data is not None:
        from llama_jax.data.pipeline import copy_tokenizer

        copy_tokenizer(data, run_dir)
    train_step = KeptStep(make_train_step(setup), cfg, setup.mesh, cache_dir, CompileLog.get())
    calibrate = make_fp8_calibration(setup)
    # Delayed fp8 scaling with no amax recorded yet: the next batch is measured first.
    calibrating = calibrate is not None and fp8.is_empty(state["fp8"])
    batches = global_batches(setup, source, rows)
    total = cfg.train.steps
    progress = _progress(quiet or not is_main)
    task = progress.add_task("train", total=total, completed=first_step, stats="compiling")
    writer = MetricsWriter(run_dir, resume_step=first_step)
    log = StepLog(cfg, writer, first_step, flops.platform_peak_flops(
        list(setup.mesh.devices.flat), keep_in=cache_dir)[0], getattr(source, "report", None))
    say = None if quiet or not is_main else progress.console.print
    evaluator = Evaluator(setup, data, writer, say)
    tasks = None
    if task_index is not None:
        from llama_jax.harness import TaskEvaluator

        tasks = TaskEvaluator(setup, data.tokenizer, writer, say, task_index)
    saved_step = first_step if first_step in ckpt.steps() else -1
    policy, rollbacks = on_nonfinite(cfg), 0

    def save(step: int) -> None:
        nonlocal saved_step
        log.check_finite(step)
        clock.enter("checkpoint")
        dog.doing(step, "checkpoint save")
        ckpt.save(step, state, source.get_state() if hasattr(source, "get_state") else None)
        saved_step = step
        clock.enter("step")

    evaluated_once = False

    def evaluate(step: int) -> None:
        nonlocal evaluated_once
        clock.enter("evaluation")
        dog.doing(step, "evaluation", compiling=not evaluated_once)
        evaluator.run(step, state["params"])
        evaluated_once = True
        clock.enter("step")

    def evaluate_tasks(step: int) -> None:
        clock.enter("evaluation")
        dog.doing(step, "lm-eval tasks", compiling=not tasks.results)
        tasks.run(step, state["params"])
        clock.enter("step")

    def account(step: int, status: str) -> None:
        writer.account(clock.row(step, status))

    def recover(bad: NonFiniteStep) -> tuple[PyTree, int]:
        """Stop in one line, or under `train.on_nonfinite=rollback` (at most
        `train.max_rollbacks` times) PaLM's recipe: back to the newest checkpoint (or the
        start), with the data going on past the batches that led to `bad`."""
        nonlocal rollbacks, saved_step, calibrating
        ckpt.wait()
        newest = ckpt.steps()
        before = f"the newest checkpoint is step {newest[-1]}" if newest else \
            "no checkpoint was written"
        if policy != "rollback":
            raise NonFiniteStep(bad.step, f"{bad.what} (train.on_nonfinite={policy}); "
                                          f"stopped, {before}") from None
        if rollbacks >= cfg.train.max_rollbacks:
            raise NonFiniteStep(bad.step, f"{bad.what} again after {rollbacks} rollbacks "
                                          f"(train.max_rollbacks={cfg.train.max_rollbacks}); "
                                          f"stopped, {before}") from None
        rollbacks += 1
        position = source.get_state() if hasattr(source, "get_state") else None
        clock.enter("restore")
        dog.doing(bad.step, "rolling back")
        restored, back_to, _, _ = _initial_state(cfg, setup, ckpt, source)
        calibrating = calibrate is not None and fp8.is_empty(restored["fp8"])
        clock.enter("step")
        clock.recomputed += max(0, step - back_to)
        if position is not None:
            source.set_state(position)
        log.restart(back_to)
        writer.rewind(back_to)
        saved_step = back_to if back_to in ckpt.steps() else -1
        if is_main:
            print(f"rollback {rollbacks} of {cfg.train.max_rollbacks}: {bad}; back to step "
                  f"{back_to}, the data goes on after the batches that led there",
                  file=sys.stderr)
        return restored, back_to

    profiler = Profiler(cfg, run_dir)
    compiles = CompileLog.get()
    step = first_step
    try:
        with progress, StopSignals() as stop:
            if first_step == 0:
                evaluate(0)
            while step < total:
                step += 1
                profiler.at(step)
                clock.enter("data_wait")
                dog.doing(step, "waiting for the batch")
                asked = time.perf_counter()
                batch = next(batches)
                waited = time.perf_counter() - asked
                clock.enter("step")
                first = clock.first_step_s is None  # this session's first: it compiles
                if calibrating:
                    dog.doing(step, "measuring fp8 amaxes for delayed scaling", compiling=True)
                    state = calibrate(state, batch)
                    calibrating = False
                dog.doing(step, "train step", compiling=first)
                before = (compiles.hits, compiles.misses, time.time())
                state, metrics = train_step(state, batch)
                stopping = stop.due(step)  # every process asks at every step, here
                if first:
                    compiled = (compiles.hits - before[0], compiles.misses - before[1],
                                compiles.seconds_between(before[2], time.time()))
                try:
                    row = log.add(step, state, metrics, waited)
                    if first:
                        clock.first_step_done(train_step.ready_at)
                        if is_main and not quiet:
                            progress.console.print(
                                f"step {step}: train step "
                                f"{describe(*compiled, cache_dir, train_step.kept)}; the first "
                                f"step began {clock.ready_s:.1f} s after start and ended "
                                f"{clock.first_step_s:.1f} s after",
                                highlight=False, soft_wrap=True)
                    if ckpt.due(step) or step == total or stopping:
                        save(step)
                except NonFiniteStep as bad:
                    state, step = recover(bad)
                    progress.update(task, completed=step)
                    continue
                if row is not None:
                    dog.observed(row["step_time_s"])
                    account(step, "running")
                    progress.update(task, completed=step, stats=_stats(row))
                if stopping:
                    clock.enter("checkpoint")
                    ckpt.wait()
                    account(step, "stopped")
                    raise stop.stopped(step, ckpt.directory / str(step))
                if evaluator.due(step) and step != total:
                    evaluate(step)
                if tasks is not None and tasks.due(step) and step != total:
                    evaluate_tasks(step)
            profiler.close()
            if saved_step != total:  # a run resumed at its last step, saved before it ended
                save(total)
            evaluate(total)
            if tasks is not None:
                evaluate_tasks(total)
    except BaseException as e:
        # The error already on its way out is the one to report; a save that also fails
        # while closing adds nothing.
        with contextlib.suppress(Exception):
            ckpt.close()
        if not isinstance(e, Preempted):
            with contextlib.suppress(Exception):
                account(log.rows[-1]["step"] if log.rows else first_step, "failed")
        raise
    else:
        clock.enter("checkpoint")
        dog.doing(total, "waiting for the last checkpoint")
        ckpt.close()
        account(total, "finished")
    finally:
        with contextlib.suppress(Exception):
            writer.close()
        getattr(source, "close", lambda: None)()
    if is_main and not quiet:
        _print_goodput(run_dir)
    return TrainResult(state, log.rows, evaluator.results)


def _print_goodput(run_dir: epath.Path) -> None:
    from rich.console import Console

    summary = goodput.report(run_dir)
    console = Console()
    console.print(goodput.table(summary, f"goodput of {run_dir}"))
    console.print(goodput.headline(summary), highlight=False, soft_wrap=True)


def _stats(row: dict[str, Any]) -> str:
    """The progress bar's figures: the window's loss, speed, and skipped steps if any."""
    loss = "skipped" if row["loss"] is None else f"{row['loss']:.4f}"
    speed = "" if row["tokens_per_sec"] is None else (
        f"  {row['tokens_per_sec']:,.0f} tok/s  MFU {row['mfu']:.1%}")
    skipped = f"  skipped {row['skipped_steps']}" if row["skipped_steps"] else ""
    return f"loss {loss}{speed}{skipped}"


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
