"""Where a step's device time goes, read from a JAX profiler trace: kernel time per step by
kind (matmuls, attention, collectives, copies, XLA's element-wise and reduction fusions) and
the kernels that take the most.

Why: MFU says how far a step is from the peak; this says which kernels hold the rest, which is
what a change to the step has to aim at (issue 20's profile study, docs/performance.md). It
reads the Chrome-trace JSON that `jax.profiler` writes beside its xplane
(`<host>.trace.json.gz`), so it needs neither TensorBoard nor xprof, and only the standard
library: it runs wherever the trace is copied to, without JAX.

A kernel is a trace event that names the HLO op it ran (`args.hlo_op`): on a GPU or TPU the
events of one device's streams, on CPU XLA's thunks on the host threads of the lowest device.
Kinds come from kernel names (cuBLAS `nvjet`/`gemm`, cuDNN attention, NCCL, memcpy, XLA
fusions), first match in `KINDS`; element-wise work a library fuses into a GEMM counts as
matmul time, as the kernel it runs in.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_jax.errors import LlamaJaxError

# (kind, pattern on the kernel name), first match wins: cuDNN's attention kernels include
# `cudnn::fusion::...` helpers, and XLA names Triton GEMMs `gemm_fusion_...`.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in (
        ("attention", r"cudnn|fmha|sdpa|flash|attention|splash"),
        ("matmul", r"nvjet|gemm|cublas|cutlass|xmma|^dot|ynn_fusion|convolution|matmul"),
        ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|"
                       r"collective-?permute|send|recv"),
        ("copy", r"^memcpy|^memset|^copy|^dynamic-update-slice"),
        ("element-wise", r"fusion|^loop_|^input_|^wrapped_|^triton"),
    ))
OTHER = "other"
# XLA:CPU traces its loops and branches as thunks around the thunks they run: containers, not
# kernels (their time is their body's).
CONTROL_FLOW = re.compile(r"(while|conditional|call)(\.\d+)?$")


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), OTHER)


@dataclass
class Summary:
    """One compiled module's kernels over `steps` executions, per step."""

    trace: str  # the file read
    module: str
    steps: int
    kernels: int  # launches per step
    kernel_ms: float  # kernel time per step (the device's busy time on one stream)
    span_ms: float  # first kernel's start to the last one's end, per step
    by_kind: dict[str, float] = field(default_factory=dict)  # ms per step
    top: list[tuple[str, float, float]] = field(default_factory=list)  # name, ms, launches

    def figures(self, top: int = 10) -> dict[str, Any]:
        """The flat figures `bench --profile` adds to its JSON."""
        return {"profile_trace": self.trace, "profile_module": self.module,
                "profile_steps": self.steps, "kernels_per_step": self.kernels,
                "kernel_ms_per_step": self.kernel_ms, "kernel_span_ms_per_step": self.span_ms,
                "kernel_ms_by_kind": self.by_kind,
                "top_kernels": [{"name": n, "ms_per_step": ms, "launches_per_step": k}
                                for n, ms, k in self.top[:top]]}

    def text(self, top: int = 30) -> str:
        lines = [f"kernels of {self.trace}",
                 f"module {self.module}, {self.steps} step(s); per step: {self.kernel_ms:.1f} ms "
                  f"of kernels in {self.span_ms:.1f} ms, {self.kernels} launches", ""]
        for kind, ms in sorted(self.by_kind.items(), key=lambda kv: -kv[1]):
            share = ms / self.kernel_ms if self.kernel_ms else 0.0
            lines.append(f"{ms:>9.1f} ms/step {share:>6.1%}  {kind}")
        lines += ["", "Top kernels (ms per step, launches per step):"]
        for name, ms, launches in self.top[:top]:
            lines.append(f"{ms:>9.2f} ms {launches:>6g}x  {kind_of(name):<12} {name[:100]}")
        return "\n".join(lines) + "\n"


def find_trace(path: str | Path) -> Path:
    """The trace file itself, or the newest one under a folder (a profiler log dir, a run's
    `profile` folder): `*.trace.json.gz` as jax.profiler writes, else a Perfetto export."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise LlamaJaxError(f"{path}: no such trace file or folder")
    for pattern in ("*.trace.json.gz", "*.trace.json", "perfetto_trace.json.gz"):
        found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise LlamaJaxError(f"{path}: no *.trace.json.gz under it (jax.profiler writes one beside "
                        f"its .xplane.pb)")


def read_events(trace: Path) -> list[dict[str, Any]]:
    try:
        opener = gzip.open if trace.suffix == ".gz" else open
        with opener(trace, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise LlamaJaxError(f"{trace}: not a readable trace ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise LlamaJaxError(f"{trace}: no traceEvents in it")
    return [e for e in events if isinstance(e, dict)]


def _names(events: list[dict[str, Any]], what: str) -> dict[Any, str]:
    """pid -> process name (what="process_name") or (pid, tid) -> thread name."""
    out = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == what:
            key = e.get("pid") if what == "process_name" else (e.get("pid"), e.get("tid"))
            out[key] = str(e.get("args", {}).get("name", ""))
    return out


def _kernel_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One device's kernels: the first accelerator's stream (GPU) or op (TPU) threads when the
    trace has a device process, else XLA:CPU's thunks of the lowest device ordinal."""
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})
           and "dur" in e and not CONTROL_FLOW.match(str(e.get("name", "")))]
    processes = _names(events, "process_name")
    devices = sorted(pid for pid, name in processes.items() if name.startswith("/device:")
                     and any(e.get("pid") == pid for e in ops))
    if devices:
        threads = _names(events, "thread_name")
        ops = [e for e in ops if e.get("pid") == devices[0]]
        named = [e for e in ops if re.match(r"Stream|XLA Ops",
                                            threads.get((e["pid"], e.get("tid")), ""))]
        return named or ops
    ordinals = {str(e["args"].get("device_ordinal", "")) for e in ops}
    if len(ordinals) > 1:
        first = min(ordinals, key=lambda o: (not o.isdigit(), int(o) if o.isdigit() else 0))
        ops = [e for e in ops if str(e["args"].get("device_ordinal", "")) == first]
    return ops


def _executions(events: list[dict[str, Any]], module: str, kernels: list[dict[str, Any]]
                ) -> int:
    """How often `module` ran in the trace: the distinct run ids on its kernels (XLA:CPU),
    else the runtime's `...Execute (module)` host events (one per execution; with several
    devices also one per device, prefixed `[ordinal]`, not counted), else 1."""
    ids = {e["args"].get("run_id") for e in kernels} - {None}
    if ids:
        return len(ids)
    pattern = re.compile(r"^[^\[].*Execute \(" + re.escape(module) + r"\)$")
    runs = sum(1 for e in events if e.get("ph") == "X" and pattern.match(str(e.get("name", ""))))
    return max(runs, 1)


def summarize(trace: str | Path, steps: int | None = None, module: str | None = None) -> Summary:
    """Per-step kernel time of `module` (default: the one with the most kernel time, the
    train step in a bench or train profile) over `steps` executions (default: counted from
    the trace)."""
    path = find_trace(trace)
    events = read_events(path)
    kernels = _kernel_events(events)
    if not kernels:
        raise LlamaJaxError(f"{path}: no kernel events (no event names the HLO op it ran)")
    per_module: dict[str, float] = collections.defaultdict(float)
    for e in kernels:
        per_module[str(e["args"].get("hlo_module", ""))] += float(e["dur"])
    if module is None:
        module = max(per_module, key=per_module.__getitem__)
    elif module not in per_module:
        raise LlamaJaxError(f"{path}: module {module!r} ran no kernel here (modules: "
                            f"{', '.join(sorted(per_module))})")
    mine = [e for e in kernels if str(e["args"].get("hlo_module", "")) == module]
    steps = steps or _executions(events, module, mine)
    time_us: dict[str, float] = collections.defaultdict(float)
    launches: collections.Counter[str] = collections.Counter()
    for e in mine:
        time_us[e["name"]] += float(e["dur"])
        launches[e["name"]] += 1
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, us in time_us.items():
        by_kind[kind_of(name)] += us / 1e3 / steps
    start = min(float(e["ts"]) for e in mine)
    end = max(float(e["ts"]) + float(e["dur"]) for e in mine)
    top = sorted(time_us, key=lambda n: -time_us[n])
    return Summary(trace=str(path), module=module, steps=steps, kernels=round(len(mine) / steps),
                   kernel_ms=sum(time_us.values()) / 1e3 / steps,
                   span_ms=(end - start) / 1e3 / steps, by_kind=dict(by_kind),
                   top=[(n, time_us[n] / 1e3 / steps, launches[n] / steps) for n in top])
