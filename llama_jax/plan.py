"""`llama-jax plan`: from a model and a slice (or a device count) to a ranked set of runnable
configurations, before renting anything.

The search space: mesh layouts over data, fsdp, tensor (and sequence for long context) x
per-device batch (through `train.microbatches`, the tokens per step being fixed) x remat
policy (x a single-pass loss for long context). Three filters, cheapest first:
1. arithmetic: layouts that cannot split the model or batch, and candidates whose state plus
   activations (a coarse per-layer estimate) exceed the chip's memory, are dropped with the
   reason; the rest are ordered by an arithmetic step time (model FLOPs, FSDP/tensor/data
   traffic) so the budget is spent on the promising ones first;
2. ahead-of-time compiles, several at once, each in its own process (`bench --json`, as
   `sweep`), until the time budget: XLA's memory plan drops what does not fit, and the
   compiled program gives the roofline's inputs (hlo_cost.py: FLOPs, bytes, collective bytes
   with loops counted) and so a predicted step time per chip generation (chips.py);
3. where the devices exist (CPU or GPU), the best predicted candidates are run for a few steps
   and ranked by what was measured.
"""

from __future__ import annotations

import concurrent.futures
import csv
import datetime
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_jax import flops, roofline
from llama_jax.config import Config, apply_overrides, load_config, to_yaml
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.sweep import (
    Layout,
    _child_environment,
    factorizations,
    layout_label,
    layout_problem,
    run_bench,
)
from llama_jax.topology import Target, parse_topology

REMATS = ("none", "dots_with_no_batch_dims_saveable", "full")
LONG_CONTEXT = 8192  # from this sequence length on, mesh.sequence and a one-pass loss are tried
MAX_TENSOR = 8  # tensor parallelism beyond one host's fast links is never the answer
MAX_MICROBATCHES = 16
COLUMNS = ("rank", "status", "reason", "seq_len", "layout", "per_device_batch", "microbatches",
           "remat", "loss_chunks", "estimated_gib", "compiled_gib", "device_memory_gib",
           "arithmetic_step_s", "predicted_step_s", "predicted_tokens_per_sec",
           "measured_step_s", "measured_tokens_per_sec", "compile_s", "overrides")


@dataclass
class PlanOptions:
    config: str
    overrides: list[str] = field(default_factory=list)
    topology: str = ""
    devices: int | None = None
    tokens_per_step: int | None = None
    seq_lens: list[int] = field(default_factory=list)
    remats: tuple[str, ...] = REMATS
    budget_minutes: float = 15.0
    jobs: int = 2
    measure: int = 3
    steps: int = 3
    out: str = ""


@dataclass
class Candidate:
    seq_len: int
    layout: Layout
    global_batch: int
    microbatches: int
    remat: str
    loss_chunks: int
    status: str = "pending"  # pending | ok | failed | pruned | skipped
    reason: str = ""
    estimated_bytes: float = 0.0
    arithmetic_s: float = math.inf
    figures: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def per_device_batch(self) -> int:
        return self.global_batch // (self.layout["data"] * self.layout["fsdp"]
                                     * self.microbatches)

    def overrides(self) -> list[str]:
        return [f"data.seq_len={self.seq_len}", f"train.global_batch_size={self.global_batch}",
                f"train.microbatches={self.microbatches}", f"model.remat={self.remat}",
                f"model.loss_chunks={self.loss_chunks}",
                *(f"mesh.{a}={s}" for a, s in self.layout.items())]

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    def predicted_s(self) -> float | None:
        return self.figures.get("predicted_step_s")

    def record(self, rank: int | None, hbm: float | None) -> dict[str, Any]:
        predicted = self.predicted_s()
        measured = self.measured.get("step_time_s")
        return {
            "rank": rank, "status": self.status, "reason": self.reason,
            "seq_len": self.seq_len, "layout": layout_label(self.layout),
            "mesh": dict(self.layout), "per_device_batch": self.per_device_batch,
            "microbatches": self.microbatches, "remat": self.remat,
            "loss_chunks": self.loss_chunks, "estimated_gib": self.estimated_bytes / 2**30,
            "compiled_gib": self.figures.get("compiled_per_device_gib"),
            "device_memory_gib": hbm / 2**30 if hbm else None,
            "arithmetic_step_s": self.arithmetic_s,
            "predicted_step_s": predicted,
            "predicted_tokens_per_sec": self.tokens / predicted if predicted else None,
            "measured_step_s": measured,
            "measured_tokens_per_sec": self.tokens / measured if measured else None,
            "compile_s": self.figures.get("compile_s"),
            "overrides": " ".join(self.overrides()),
            "figures": {k: v for k, v in self.figures.items() if k != "custom_calls"},
        }


# ---------------------------------------------------------------------------------------------
# The space and its arithmetic


def candidates(cfg: Config, devices: int, tokens_per_step: int, seq_lens: Sequence[int],
               remats: Sequence[str]) -> list[Candidate]:
    out = []
    for seq_len in seq_lens:
        if tokens_per_step % seq_len:
            raise ConfigError(f"--tokens-per-step {tokens_per_step} is not a multiple of the "
                              f"sequence length {seq_len}")
        rows = tokens_per_step // seq_len
        axes = ("data", "fsdp", "sequence", "tensor") if seq_len >= LONG_CONTEXT else \
            ("data", "fsdp", "tensor")
        chunks = (0, 1) if seq_len >= LONG_CONTEXT else (0,)
        for sizes in factorizations(devices, len(axes)):
            layout = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **dict(zip(axes, sizes,
                                                                                  strict=True))}
            if layout["tensor"] > MAX_TENSOR:
                continue
            shards = layout["data"] * layout["fsdp"]
            for micro in (m for m in range(1, MAX_MICROBATCHES + 1) if m & (m - 1) == 0):
                if rows % (shards * micro):
                    continue
                for remat in remats:
                    for loss_chunks in chunks:
                        out.append(Candidate(seq_len, layout, rows, micro, remat, loss_chunks))
    return out


def _bytes_of(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def estimated_bytes(cfg: Config, c: Candidate, state_total: int) -> float:
    """Per device: train state and gradients over the parameter shards, the activations the
    remat policy keeps for every layer of one microbatch, one layer's working set, and the
    logits. Coarse on purpose (the compile is the judge); it only drops the hopeless."""
    m, lay = cfg.model, c.layout
    shards = lay["fsdp"] * lay["sequence"] * lay["tensor"]
    params = state_total / 3  # parameters, AdamW's two moments: the same bytes each
    state = (state_total + params) / shards  # + gradients
    t = lay["tensor"]
    tokens = c.per_device_batch * c.seq_len / lay["sequence"]
    width = _bytes_of(m.compute_dtype)
    d, h = m.hidden_size, m.head_size
    projections = ((m.num_heads + 2 * m.kv_heads) * h + m.num_heads * h) / t
    mlp = (3 if m.activation == "swiglu" else 2) * m.intermediate_size / t
    per_token_layer = {
        "full": d,
        "dots_with_no_batch_dims_saveable": 2 * d + projections + mlp,
        "projections_and_attention": 2 * d + projections,
        "dots_saveable": 2 * d + projections + mlp,
    }.get(c.remat, 6 * d + 2 * projections + 2 * mlp)
    working = (6 * d + 2 * projections + 2 * mlp) * tokens * width
    kept = per_token_layer * tokens * width * m.num_layers
    logits = tokens * m.vocab_size / t * 4 * 2  # float32 logits and their gradient
    if c.loss_chunks != 1:
        logits = min(logits, 2**30)
    return state + kept + working + logits


def arithmetic_seconds(cfg: Config, c: Candidate, limits: roofline.Roofline,
                       param_bytes: float) -> float:
    """A step's time from the model alone: FLOPs (with remat's recompute) over the peak, plus
    FSDP's gathers and reduce-scatters, the data axis's all-reduce and tensor parallelism's
    activation all-reduces over the interconnect. Used to order compiles, not to rank."""
    m, lay = cfg.model, c.layout
    devices = math.prod(lay.values())
    recompute = {"none": 1.0, "full": 4 / 3}.get(c.remat, 1.05)
    compute = flops.flops_per_token(m, c.seq_len) * c.tokens * recompute / devices
    width = _bytes_of(m.compute_dtype)
    t, f, dp, sp = lay["tensor"], lay["fsdp"], lay["data"], lay["sequence"]
    gather = param_bytes / 4 * width / t * (f * sp - 1) / (f * sp) * 2 * c.microbatches
    reduce = param_bytes / t * (f * sp - 1) / (f * sp)
    allreduce = 2 * param_bytes / (t * f * sp) * (dp - 1) / dp
    tokens = c.per_device_batch * c.seq_len / sp
    activations = (4 * tokens * m.hidden_size * width * (t - 1) / t * m.num_layers
                   * c.microbatches)
    return compute / limits.peak_flops + (gather + reduce + allreduce + activations) \
        / limits.ici_bytes_per_s


# ---------------------------------------------------------------------------------------------
# Compiling and measuring


class Budget:
    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + minutes * 60
        self.durations: list[float] = []
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expected(self) -> float:
        with self.lock:
            return statistics.median(self.durations) if self.durations else 0.0

    def done(self, seconds: float) -> None:
        with self.lock:
            self.durations.append(seconds)


def predict(c: Candidate, limits: roofline.Roofline) -> None:
    """The step time from the compiled program's figures, with the plan's one roofline."""
    if "hlo_kernels" in c.figures:
        c.figures["predicted_step_s"] = limits.step_seconds(c.figures)


def compile_candidates(opts: PlanOptions, todo: list[Candidate], devices: int,
                       tpu: Target | None, budget: Budget, limits: roofline.Roofline,
                       progress: Callable[[str], None]) -> bool:
    """Compile `todo` in order, `opts.jobs` at a time, while the budget allows another.
    Returns whether a Ctrl-C stopped it: the candidates compiled by then are kept, the rest
    skipped (the benches in flight had the same Ctrl-C, as the terminal's process group)."""
    lock = threading.Lock()
    queue = list(todo)
    stop = threading.Event()

    def worker(index: int) -> None:
        while True:
            with lock:
                if not queue:
                    return
                c = queue.pop(0)
            if stop.is_set():
                c.status, c.reason = "skipped", INTERRUPTED
                continue
            left = budget.left()
            if left <= max(budget.expected(), 1.0):
                c.status, c.reason = "skipped", "not compiled: the time budget ran out"
                continue
            arguments = [opts.config, *opts.overrides, *c.overrides()]
            arguments += ["--topology", opts.topology] if tpu else ["--compile-only"]
            start = time.monotonic()
            c.status, c.reason, c.figures = run_bench(
                arguments, _child_environment(devices, index, tpu), left)
            budget.done(time.monotonic() - start)
            if c.status == "failed" and c.reason.startswith("timed out"):  # the deadline
                c.status, c.reason = "skipped", "not compiled: the time budget ran out during it"
            if c.status == "failed" and stop.is_set():
                c.status, c.reason = "skipped", INTERRUPTED
            predict(c, limits)
            progress(f"compiled {describe(c)}: {c.status}"
                     + (f" ({c.reason})" if c.reason else ""))

    with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        futures = [pool.submit(worker, i) for i in range(opts.jobs)]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            stop.set()  # each worker ends after its bench in flight
    return stop.is_set()


def measure_candidates(opts: PlanOptions, best: list[Candidate], devices: int,
                       progress: Callable[[str], None]) -> bool:
    """A few real steps of each (one at a time: they share the devices). Returns whether a
    Ctrl-C stopped it (the measurements made by then are kept)."""
    for index, c in enumerate(best):
        arguments = [opts.config, *opts.overrides, *c.overrides(), "--steps", str(opts.steps)]
        try:
            status, reason, figures = run_bench(arguments,
                                                _child_environment(devices, index, None), 1800)
        except KeyboardInterrupt:
            return True
        c.measured = figures if status == "ok" else {"error": reason}
        progress(f"measured {describe(c)}: "
                 + (f"{figures['step_time_s'] * 1e3:.1f} ms" if status == "ok" else reason))
    return False


INTERRUPTED = "not compiled: the plan was interrupted"


def describe(c: Candidate) -> str:
    return (f"{layout_label(c.layout)} seq={c.seq_len} batch/device={c.per_device_batch} "
            f"x{c.microbatches} remat={c.remat}" + (" loss=1 pass" if c.loss_chunks == 1 else ""))


# ---------------------------------------------------------------------------------------------
# The plan


def _roofline_for(tpu: Target | None, devices: int) -> roofline.Roofline:
    """The chip table's for a slice or a local accelerator; for CPU devices, measured in a
    process of its own where the `devices` simulated devices exist, while no compile runs
    beside it."""
    if tpu is not None:
        return roofline.of_chip(tpu.chip)
    import jax

    if jax.devices()[0].platform != "cpu":
        found = roofline.chip_roofline(jax.devices()[0].device_kind)
        if found is None:
            raise ConfigError(f"plan: no roofline for {jax.devices()[0].device_kind} "
                              "(llama_jax/chips.py lists the chips it knows)")
        return found
    command = [sys.executable, "-m", "llama_jax.roofline", str(devices)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=_child_environment(devices, 0, None))
    try:
        return roofline.Roofline.from_json(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LlamaJaxError(f"plan: measuring {devices} CPU devices failed: {why}") from None


def _device_memory(tpu: Target | None) -> float | None:
    if tpu is not None:
        return float(tpu.hbm_bytes)
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    try:
        return float((device.memory_stats() or {}).get("bytes_limit")) or None
    except (TypeError, ValueError, RuntimeError):
        return None


def run_plan(opts: PlanOptions, progress: Callable[[str], None] = lambda _: None
             ) -> dict[str, Any]:
    cfg = load_config(opts.config, opts.overrides)  # a bad key fails here, once
    tpu = parse_topology(opts.topology) if opts.topology else None
    if tpu is not None and tpu.num_slices > 1:
        raise ConfigError("plan --topology: one slice at a time (multi-slice layouts: sweep)")
    if tpu is None and not opts.devices:
        raise ConfigError("plan needs --topology SLICE or --devices N")
    devices = tpu.chips if tpu else int(opts.devices or 0)
    seq_lens = opts.seq_lens or [cfg.data.seq_len]
    tokens = opts.tokens_per_step or cfg.train.global_batch_size * cfg.data.seq_len
    unknown = [r for r in opts.remats if r not in REMATS + ("dots_saveable",
                                                            "projections_and_attention")]
    if unknown:
        raise ConfigError(f"--remat {','.join(unknown)}: not a remat policy")
    limits = _roofline_for(tpu, devices)
    hbm = _device_memory(tpu)
    state = flops.state_bytes(cfg)
    found = candidates(cfg, devices, tokens, seq_lens, opts.remats)
    todo = []
    for c in found:
        at = apply_overrides(cfg, c.overrides())
        problem = layout_problem(at, c.layout, {}, devices)
        if problem:
            c.status, c.reason = "pruned", problem
            continue
        c.estimated_bytes = estimated_bytes(at, c, state["total"])
        if hbm and c.estimated_bytes > hbm:
            c.status, c.reason = "pruned", (f"estimated {c.estimated_bytes / 2**30:.1f} GiB "
                                            f"per device, over {hbm / 2**30:.1f}")
            continue
        c.arithmetic_s = arithmetic_seconds(at, c, limits, state["params"])
        todo.append(c)
    todo.sort(key=lambda c: c.arithmetic_s)
    progress(f"{len(found)} candidates, {len(todo)} after arithmetic; compiling, "
             f"{opts.jobs} at a time, for at most {opts.budget_minutes:g} minutes")
    budget = Budget(opts.budget_minutes)
    interrupted = compile_candidates(opts, todo, devices, tpu, budget, limits, progress)
    # Measured again, minutes later: a busy moment of the host is not its rate.
    if limits.measured and not interrupted:
        limits = limits.best_of(_roofline_for(tpu, devices))
        for c in todo:
            predict(c, limits)
    compiled = sorted((c for c in todo if c.status == "ok" and c.predicted_s()),
                      key=lambda c: c.tokens / c.predicted_s(), reverse=True)
    measured = tpu is None and opts.measure > 0 and not interrupted
    if measured:
        interrupted = measure_candidates(opts, compiled[:opts.measure], devices, progress)
    ranked = _ranked(compiled)
    rows = [c.record(i + 1, hbm) for i, c in enumerate(ranked)]
    rest = [c for c in found if c not in ranked]
    order = {"failed": 0, "skipped": 1, "pruned": 2, "pending": 3, "ok": 4}
    rows += [c.record(None, hbm) for c in sorted(rest, key=lambda c: order[c.status])]
    best = ranked[0] if ranked else None
    return {
        "interrupted": interrupted,
        "config": opts.config, "overrides": opts.overrides,
        "topology": str(tpu) if tpu else None, "devices": devices, "tokens_per_step": tokens,
        "roofline": limits.to_json(),
        "budget_minutes": opts.budget_minutes, "measured": measured,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "best_overrides": best.overrides() if best else None,
        "rows": rows,
    }


def _ranked(compiled: list[Candidate]) -> list[Candidate]:
    """Measured candidates first, fastest measured first; then the others by prediction."""
    timed = sorted((c for c in compiled if "step_time_s" in c.measured),
                   key=lambda c: c.tokens / c.measured["step_time_s"], reverse=True)
    return timed + [c for c in compiled if c not in timed]


# ---------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict[str, Any], out: Path, opts: PlanOptions) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "plan.json", out / "plan.csv", out / "plan.png"]
    (out / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / "plan.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    plot(result, out / "plan.png")
    if result["best_overrides"]:
        best = load_config(opts.config, [*opts.overrides, *result["best_overrides"]])
        (out / "plan.yaml").write_text(
            f"# llama-jax plan {opts.config} on {result['topology'] or result['devices']}"
            f" devices: the best candidate ({result['date']})\n" + to_yaml(best))
        written.append(out / "plan.yaml")
    return written


def plot(result: dict[str, Any], path: Path) -> None:
    """Predicted tokens/s against compiled memory per chip, one point per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["predicted_tokens_per_sec"] and r["compiled_gib"]]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for remat, marker in zip(REMATS + ("dots_saveable", "projections_and_attention"), "os^vD",
                             strict=False):
        mine = [r for r in rows if r["remat"] == remat]
        if mine:
            ax.scatter([r["compiled_gib"] for r in mine],
                       [r["predicted_tokens_per_sec"] for r in mine], marker=marker,
                       label=f"remat={remat}", alpha=0.8)
    for r in rows:
        if r["rank"] and r["rank"] <= 3:
            ax.annotate(f"#{r['rank']} {r['layout']} b={r['per_device_batch']}",
                        (r["compiled_gib"], r["predicted_tokens_per_sec"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    limit = next((r["device_memory_gib"] for r in rows if r["device_memory_gib"]), None)
    if limit:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"memory {limit:.1f} GiB")
    ax.set_xlabel("compiled memory per device (GiB)")
    ax.set_ylabel("predicted tokens / s")
    where = result["topology"] or f"{result['devices']} devices"
    ax.set_title(f"llama-jax plan {Path(result['config']).stem} on {where}")
    if rows:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)


def print_table(result: dict[str, Any], shown: int = 15) -> None:
    from rich.console import Console
    from rich.table import Table

    where = result["topology"] or f"{result['devices']} devices"
    table = Table(title=f"llama-jax plan {result['config']} on {where}, "
                        f"{result['tokens_per_step']:,} tokens per step")
    columns = ["#", "layout", "seq", "batch/dev", "micro", "remat", "GiB", "pred. ms",
               "pred. tok/s"]
    if result["measured"]:
        columns += ["meas. ms", "meas. tok/s"]
    columns.append("status")
    for name in columns:
        table.add_column(name, justify="left" if name in ("layout", "remat", "status")
                         else "right")
    ranked = [r for r in result["rows"] if r["rank"]]
    others = [r for r in result["rows"] if not r["rank"] and r["status"] == "failed"]
    for r in ranked[:shown] + others[:5]:
        memory = r["compiled_gib"] if r["compiled_gib"] is not None else r["estimated_gib"]
        cells = [str(r["rank"] or ""), r["layout"], str(r["seq_len"]),
                 str(r["per_device_batch"]), str(r["microbatches"]), r["remat"]
                 + (" 1-pass loss" if r["loss_chunks"] == 1 else ""), _fmt(memory, ".2f"),
                 _fmt(r["predicted_step_s"] and r["predicted_step_s"] * 1e3, ".1f"),
                 _fmt(r["predicted_tokens_per_sec"], ",.0f")]
        if result["measured"]:
            cells += [_fmt(r["measured_step_s"] and r["measured_step_s"] * 1e3, ".1f"),
                      _fmt(r["measured_tokens_per_sec"], ",.0f")]
        cells.append(r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
        table.add_row(*cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    counts: dict[str, int] = {}
    for r in result["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
