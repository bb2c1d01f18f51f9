"""What a run reports as it goes: metrics.jsonl and TensorBoard rows (process 0 only), the
throughput row of a logging step, and a profiler trace of chosen steps."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from llama_jax import flops, goodput, host_memory, ops
from llama_jax.config import Config
from llama_jax.errors import LlamaJaxError
from llama_jax.precision import NonFiniteStep, first_unabsorbed, on_nonfinite
from llama_jax.storage import Appender, is_remote, replace_text, upload_tree


def _summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without torch.

    tensorboardX imports torch whenever it is installed (only to accept torch tensors as
    images), which costs every start 2 s on a host with torch: a fifth of a warm restart of
    the default run. Scalars never need it, so torch is hidden for that one import; a torch
    already imported is left as it is, and a later `import torch` works as usual."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _summary_writer_class()


class MetricsWriter:
    """metrics.jsonl plus TensorBoard scalars; only process 0 writes.

    On resume from step N, rows after N (written by the run that was interrupted) are dropped
    so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: epath.Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = os.fspath(run_dir / "tb")
        self.tb = None
        self._open(resume_step)

    def _open(self, resume_step: int) -> None:
        if self.enabled:
            if self.path.is_file():
                self._keep_through(resume_step)
            self.rows = Appender(self.path)
            self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        """Go back to `step` (a rollback): rows after it are dropped, as on resume."""
        self.close()
        self._open(step)

    def _keep_through(self, resume_step: int) -> None:
        """Drop rows after `resume_step`, and a torn last line (a crash mid-write). Goodput rows
        are the sessions' time accounts, kept whatever their step: the last of each."""
        kept: list[str | int] = []  # lines, and session numbers standing for their accounts
        accounts: dict[int, str] = {}
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
            if goodput.is_goodput(row):
                accounts[row["session"]] = line
                kept.append(row["session"])
            elif row.get("step", 0) <= resume_step:
                kept.append(line)
        # each session's account where its first row was, holding its last figures
        kept = [accounts.pop(x) if isinstance(x, int) else x for x in kept
                if not isinstance(x, int) or x in accounts]
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
            elif isinstance(value, dict):  # per source: one curve each
                for name, v in value.items():
                    if isinstance(v, int | float):
                        self.tb.add_scalar(f"{prefix}/{key}/{name}", v, row["step"])
        if not self.rows.remote:  # on GCS each flush uploads the whole event file again
            self.tb.flush()

    def account(self, row: dict[str, Any]) -> None:
        """A goodput row (`goodput.Clock.row`): metrics.jsonl only, not TensorBoard."""
        if self.enabled:
            self.rows.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.rows.flush()
            self.tb.close()


class StepLog:
    """The train metrics of each step: kept on the device and fetched together every
    `train.log_every` steps (fetching every step would stall dispatch), timed from the end of
    the first (compiling) step, and written as one row per logging step.

    Fetching is also when a step the loss scale did not absorb comes to light: unless
    `train.on_nonfinite` is skip, `NonFiniteStep` names the first such step, and the loop
    decides between stopping and rolling back.
    """

    def __init__(self, cfg: Config, writer: MetricsWriter, first_step: int, peak_flops: float,
                 data_report: Callable[[], dict[str, Any]] | None = None):
        self.writer = writer
        self.data_report = data_report  # the data's own fields of a row (tokens by source)
        self.every, self.last = cfg.train.log_every, cfg.train.steps
        self.tolerate = on_nonfinite(cfg) == "skip"
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.fpt = flops.flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = peak_flops
        m = cfg.model
        # cuDNN's packed layout: fuller rows than this take the XLA attention (ops.py)
        self.segment_bound = m.max_segments_per_row if (
            m.attention == "cudnn" and m.max_segments_per_row > 1
            and ops.cudnn_takes_packed_rows()) else 0
        self.rows: list[dict[str, Any]] = []
        self.restart(first_step)

    def restart(self, step: int) -> None:
        """Go on from `step` (the start, or a rollback to it): later rows are forgotten."""
        self.pending: list[dict[str, jax.Array]] = []
        self.waited = 0.0
        self.rows = [row for row in self.rows if row["step"] <= step]
        self.t_last: float | None = None
        self.step_last = step

    def add(self, step: int, state: dict[str, Any], metrics: dict[str, jax.Array],
            data_wait: float = 0.0) -> dict[str, Any] | None:
        """Record a step's metrics and how long it waited for its batch; the row written when
        this step is a logging step."""
        self.pending.append(metrics)
        self.waited += data_wait
        if self.t_last is None:
            jax.block_until_ready(state["step"])
            self.t_last, self.step_last = time.perf_counter(), step
        if step % self.every and step != self.last:
            return None
        host = self._fetch(step)
        now = time.perf_counter()
        row = log_row(step, host, now - self.t_last, step - self.step_last,
                      self.tokens_per_step, self.fpt, self.peak)
        row["data_wait_s"] = self.waited / len(host)
        host_memory.return_freed()  # what is resident, not what malloc kept (host_memory.py)
        row["host_rss_gib"] = host_memory.resident_gib()
        if self.data_report is not None:
            row.update(self.data_report())
        if 0 < self.segment_bound < row.get("documents_per_row", 0):
            print(f"note: a row before step {step} held {row['documents_per_row']} documents, "
                  f"more than model.max_segments_per_row={self.segment_bound}: such steps ran "
                  f"the xla attention blocks instead of cuDNN (same result, slower)",
                  file=sys.stderr)
            self.segment_bound = 0  # said once
        self.t_last, self.step_last, self.waited = now, step, 0.0
        self.rows.append(row)
        self.writer.write(row)
        return row

    def check_finite(self, step: int) -> None:
        """Before saving `step`: raise for a step not yet logged that the run may not keep."""
        self.pending = [jax.device_get(m) for m in self.pending]
        self._police(step, self.pending)

    def _fetch(self, step: int) -> list[dict[str, Any]]:
        host = jax.device_get(self.pending)
        self.pending.clear()
        self._police(step, host)
        return host

    def _police(self, step: int, host: list[dict[str, Any]]) -> None:
        bad = first_unabsorbed(step - len(host) + 1, host)
        if bad is not None and not self.tolerate:
            raise NonFiniteStep(*bad)


def log_row(step: int, host: list[dict], seconds: float, steps: int, tokens_per_step: int,
            fpt: float, peak: float) -> dict[str, Any]:
    """Loss, z-loss and grad norm over the steps whose update was applied (None when every
    step of the window was skipped); speed over all of them."""
    applied = [m for m in host if bool(m["finite"])]
    tps = tokens_per_step * steps / seconds if steps and seconds > 0 else None

    def mean(key: str) -> float | None:
        return float(np.mean([m[key] for m in applied])) if applied else None

    return {
        "step": step,
        "loss": mean("loss"),
        "grad_norm": float(applied[-1]["grad_norm"]) if applied else None,
        "lr": float(host[-1]["lr"]),
        "z_loss": mean("z_loss"),
        "loss_scale": float(host[-1]["loss_scale"]),
        "skipped_steps": int(host[-1]["skipped_steps"]),
        "tokens_per_sec": tps,
        "step_time_s": seconds / steps if steps else None,
        "mfu": None if tps is None else flops.mfu(tps, fpt, peak),
        # packed rows: the most documents one row of the window held
        **({"documents_per_row": int(max(m["documents_per_row"] for m in host))}
           if "documents_per_row" in host[-1] else {}),
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
                self.local = tempfile.mkdtemp(prefix="llama_jax_profile_")
            # The Perfetto trace too: `llama-jax kernels` reads either, whichever this JAX
            # version writes.
            jax.profiler.start_trace(self.local or os.fspath(self.path),
                                     create_perfetto_trace=True)
            self.active = True
        elif self.active and step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self.local:
                upload_tree(epath.Path(self.local), self.path)
                shutil.rmtree(self.local, ignore_errors=True)
                self.local = None
