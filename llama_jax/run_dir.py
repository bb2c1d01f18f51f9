"""Run-directory safety: one writer at a time, and a resume that never damages the run.

A run directory is what a user cannot afford to lose. Before `train` writes anything there it
takes the directory's lock, and on resume it compares the new config with the one the run was
started with: settings that apply to the saved state as it is (steps, cadences, the mesh
layout, optimizer hyperparameters, ...) are applied and listed; anything else (model shapes,
state dtypes, the data, the optimizer's structure) is refused in one line, before a single file
is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import psutil
from etils import epath

from llama_jax.config import Config, config_from_yaml_text
from llama_jax.errors import LlamaJaxError, brief
from llama_jax.storage import create_exclusive, replace_text

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0

# Settings that may differ between a run's start and a resume: they change how the run goes
# on, not what the saved state is. Prefixes end with a dot.
RESUMABLE = (
    "run_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.eval_tasks", "train.eval_tasks_every", "train.eval_tasks_limit",
    "train.eval_tasks_include_path",
    "train.profile_start", "train.profile_steps", "train.microbatches", "train.fused_loss",
    "train.z_loss", "train.loss_scale", "train.loss_scale_init", "train.loss_scale_window",
    "train.loss_scale_hysteresis", "train.loss_scale_min", "train.on_nonfinite",
    "train.max_rollbacks", "train.step_timeout_s", "train.compilation_cache_dir",
    "checkpoint.", "mesh.", "distributed.", "data.prefetch",
    "data.num_workers", "data.read_threads", "data.token_cache", "data.cache_dir",
    "data.tfds_data_dir", "model.remat", "model.attention",
    "model.attention_block", "model.max_segments_per_row", "model.loss_chunks",
    "model.context_parallel", "model.fp8_head",
    "model.compute_dtype", "model.quantization", "model.fp8_gradients",
    "model.fp8_weight_gradient", "model.fp8_scaling", "optimizer.lr", "optimizer.schedule",
    "optimizer.warmup_steps", "optimizer.min_lr_ratio", "optimizer.decay_fraction",
    "optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.weight_decay",
)


class RunDirError(LlamaJaxError):
    """The run directory cannot be used as asked; nothing in it was changed."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and not (prefix == "mesh.rules."):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def config_changes(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """(applied, refused): `key: old -> new` for each setting that differs."""
    old, cur = _flat(asdict(saved)), _flat(asdict(new))
    applied, refused = [], []
    for key in sorted(set(old) | set(cur)):
        if old.get(key) == cur.get(key):
            continue
        line = f"{key}: {old.get(key)!r} -> {cur.get(key)!r}"
        # Clipping on or off adds or removes a stage of the optimizer's state.
        if key == "optimizer.clip_norm" and (old[key] > 0) == (cur[key] > 0):
            applied.append(line)
        elif _resumable(key):
            applied.append(line)
        else:
            refused.append(line)
    return applied, refused


def check_resume(run_dir: epath.Path, cfg: Config) -> list[str]:
    """The changes a resume applies, or RunDirError when the run's state cannot take them.

    The reference is the config.yaml the run was started with; a directory without one has no
    run to resume (or predates it) and anything goes.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = config_from_yaml_text(path.read_text())
    except Exception as e:  # noqa: BLE001 - an unreadable config is a reason to stop, not crash
        raise RunDirError(f"{path}: cannot read the run's saved config ({type(e).__name__}); "
                          f"nothing was changed") from None
    applied, refused = config_changes(saved, cfg)
    if refused:
        raise RunDirError(
            f"{run_dir} holds a run whose saved state cannot take these changes: "
            f"{'; '.join(refused)}. Nothing was changed; use another run_dir, or the saved "
            f"settings (see {path})")
    return applied


# ---------------------------------------------------------------------------------------------
# One writer per run directory


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder still runs: by process on this host, by heartbeat elsewhere."""
    if holder.get("host") == socket.gethostname():
        try:
            proc = psutil.Process(int(holder["pid"]))
            return abs(proc.create_time() - float(holder.get("process_start", 0))) < 2.0
        except Exception:  # noqa: BLE001 - no such process, or no permission to look
            return False
    return time.time() - float(holder.get("heartbeat", 0)) < 10 * HEARTBEAT_S


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


class RunLock:
    """`run_dir/.lock`: JSON naming the holder (host, pid, start time) and a heartbeat that
    the holder rewrites every 30 s. Created only if absent (O_EXCL on a disk, a conditional
    write on an object store), so two starts cannot both win; a lock whose holder is gone
    (its process on this host is not running, or elsewhere its heartbeat is over 5 minutes
    old) is taken over with a note."""

    def __init__(self, run_dir: epath.Path):
        self.path = run_dir / LOCK_NAME
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.record: dict[str, Any] = {}

    def _write_new(self) -> bool:
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                       "process_start": psutil.Process().create_time(), "heartbeat": now}
        try:
            return create_exclusive(self.path, json.dumps(self.record).encode())
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot create the run's lock: "
                              f"{e.strerror or e}") from None
        except ValueError as e:  # TensorStore's error for a refused or failed request
            raise RunDirError(f"{self.path}: cannot create the run's lock: "
                              f"{brief(e, 200)}") from None

    def acquire(self) -> None:
        for _ in range(2):
            if self._write_new():
                break
            try:
                holder = json.loads(self.path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder and _holder_alive(holder):
                raise RunDirError(f"{self.path.parent} is in use by another train "
                                  f"({_describe(holder)}); nothing was changed")
            print(f"note: taking over {self.path} from a run that is gone"
                  f"{' (' + _describe(holder) + ')' if holder else ''}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            raise RunDirError(f"{self.path}: another train took the lock at the same moment")
        self.thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.record["heartbeat"] = time.time()
            with contextlib.suppress(Exception):  # a missed beat only ages the lock
                replace_text(self.path, json.dumps(self.record))

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()


@contextlib.contextmanager
def locked(run_dir: epath.Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the block (only where `enabled`: process 0)."""
    if not enabled:
        yield
        return
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
