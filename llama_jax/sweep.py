"""`llama-jax sweep`: every mesh layout of a device count, compiled and measured one by one.

Each layout runs as its own `llama-jax bench ... --json` process, so a layout that crashes the
compiler, runs out of memory or hangs is recorded with its reason and cannot take the sweep (or
the layouts after it) down. Layouts that cannot split the model or the batch are listed with
the reason before anything is compiled.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_jax.children import child_environment
from llama_jax.config import MESH_AXES, Config, apply_overrides, load_config
from llama_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, env_int
from llama_jax.errors import ConfigError
from llama_jax.topology import Target, compile_only_environment, parse_topology

Layout = dict[str, int]

# Columns of sweep.csv, in order; the JSON rows hold the same keys.
COLUMNS = ("rank", "layout", "status", "reason", "compile_s", "argument_gib", "output_gib",
           "temp_gib", "alias_gib", "compiled_per_device_gib", "device_memory_gib", "fits",
           "required_gib", "xla_flops_per_device", "step_time_s", "tokens_per_sec", "mfu",
           "device_peak_gib")


@dataclass
class SweepOptions:
    config: str
    overrides: list[str] = field(default_factory=list)
    devices: int | None = None
    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    layouts: str = ""
    steps: int = 5
    compile_only: bool = False
    topology: str = ""
    out: str = ""
    timeout_s: float = 900.0


@dataclass
class Row:
    layout: Layout
    status: str  # ok | failed | invalid | not run (a sweep interrupted before it)
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return layout_label(self.layout)

    def record(self, rank: int | None) -> dict[str, Any]:
        out = {"rank": rank, "layout": self.label, "status": self.status, "reason": self.reason}
        out.update({k: self.figures.get(k) for k in COLUMNS if k not in out})
        out["mesh"] = dict(self.layout)
        return out


def with_dcn(layout: Layout, dcn: Layout) -> Layout:
    """The layout as recorded: ICI sizes, plus `dcn_<axis>` for each axis joined over DCN."""
    return {**layout, **{f"dcn_{a}": s for a, s in dcn.items() if s > 1}}


def layout_label(layout: Layout) -> str:
    shown = [f"{a}={s}" for a, s in layout.items() if s > 1 and not a.startswith("dcn_")]
    shown += [f"{a}={s}" for a, s in layout.items() if s > 1 and a.startswith("dcn_")]
    return ",".join(shown) or "single device"


# ---------------------------------------------------------------------------------------------
# Which layouts


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered way to write n as a product of k positive integers."""
    if k == 1:
        return [(n,)]
    out = []
    for first in range(1, n + 1):
        if n % first == 0:
            out += [(first, *rest) for rest in factorizations(n // first, k - 1)]
    return out


def enumerate_layouts(devices: int, axes: Sequence[str]) -> list[Layout]:
    return [{a: dict(zip(axes, sizes, strict=True)).get(a, 1) for a in MESH_AXES}
            for sizes in factorizations(devices, len(axes))]


def parse_axes(text: str) -> tuple[str, ...]:
    axes = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown or not axes or len(set(axes)) != len(axes):
        raise ConfigError(f"--axes {text!r}: give distinct mesh axes among "
                          f"{', '.join(MESH_AXES)}")
    return axes


def parse_layouts(text: str) -> list[Layout]:
    """`"data=2,fsdp=4;fsdp=8"`: axes not named are 1; a layout named twice counts once."""
    layouts = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        layout = dict.fromkeys(MESH_AXES, 1)
        for item in part.split(","):
            axis, _, size = item.strip().partition("=")
            if axis not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
                raise ConfigError(f"--layouts: cannot read {item.strip()!r} in {part!r}; "
                                  f"expected AXIS=SIZE with AXIS among {', '.join(MESH_AXES)}")
            layout[axis] = int(size)
        if layout not in layouts:  # "fsdp=8;fsdp=8,data=1" is one layout, measured once
            layouts.append(layout)
    if not layouts:
        raise ConfigError(f"--layouts {text!r} names no layout")
    return layouts


def layout_overrides(layout: Layout, dcn: Layout) -> list[str]:
    """Every mesh axis is set, so no `-1` or size from the config file leaks in."""
    return ([f"mesh.{a}={layout[a]}" for a in MESH_AXES]
            + [f"mesh.dcn_{a}={dcn.get(a, 1)}" for a in MESH_AXES])


def layout_problem(cfg: Config, layout: Layout, dcn: Layout, devices: int) -> str | None:
    """Why this layout cannot run this config on `devices` devices (None: it can)."""
    from llama_jax.sharding import check_divisibility

    sizes = {a: layout[a] * dcn.get(a, 1) for a in MESH_AXES}
    total = math.prod(sizes.values())
    if total != devices:
        return f"uses {total} devices, not {devices}"
    try:
        check_divisibility(apply_overrides(cfg, layout_overrides(layout, dcn)), sizes)
    except ConfigError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# Running one layout


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"crashed ({name})"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pattern in (r"RESOURCE_EXHAUSTED.*", r"llama-jax \w+: error: .*", r"\w+Error: .*"):
        for line in reversed(lines):
            if m := re.search(pattern, line):
                return m.group(0)[:240]
    return (lines[-1][:240] if lines else "") or f"exited with status {returncode}"


_TPU_OOM = re.compile(r"memory required for (?P<what>.+?) \((?P<need>[\d.]+)G\) exceeds "
                      r"available HBM \((?P<have>[\d.]+)G\)")


def _child_environment(devices: int, index: int, tpu: Target | None) -> dict[str, str]:
    env = child_environment(signal.SIGKILL)  # a measurement that ends with this process
    processes = env_int(ENV_NUM_PROCESSES, 0)
    if tpu is not None:  # one process compiles for the whole slice (or all the GPUs)
        env.update(compile_only_environment(tpu))
        for key in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
            env.pop(key, None)
        return env
    if processes <= 1:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if processes > 1 and env.get(ENV_COORDINATOR):
        # Each layout's processes meet at their own port: the previous layout's coordinator
        # may still hold the last one.
        host, _, port = env[ENV_COORDINATOR].rpartition(":")
        env[ENV_COORDINATOR] = f"{host}:{int(port) + 1 + index}"
    return env


def run_bench(arguments: list[str], env: dict[str, str], timeout_s: float
              ) -> tuple[str, str, dict[str, Any]]:
    """One `llama-jax bench ... --json` in a process of its own: (status, reason, figures),
    status ok or failed; a layout that does not fit is a failure with the memory it needs."""
    command = [sys.executable, "-m", "llama_jax.cli", "bench", *arguments, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired:
        return "failed", f"timed out after {timeout_s:.0f} s", {}
    if done.returncode != 0:
        reason = _failure_reason(done.returncode, done.stderr)
        if m := _TPU_OOM.search(reason):  # the TPU compiler refuses what cannot fit
            what, need, have = m["what"], float(m["need"]), float(m["have"])
            return "failed", (f"does not fit: {what} alone need {need:.1f} GiB of the "
                              f"{have:.1f} GiB per chip ({need - have:.1f} GiB over)"), \
                {"required_gib": need, "device_memory_gib": have, "fits": False}
        return "failed", reason, {}
    try:
        figures = json.loads([x for x in done.stdout.splitlines() if x.startswith("{")][-1])
    except (IndexError, json.JSONDecodeError):
        return "failed", "no result printed: " + done.stdout.strip()[-200:], {}
    if figures.get("fits") is False:
        over = figures["compiled_per_device_gib"] - figures["device_memory_gib"]
        return "failed", (f"does not fit: needs {over:.1f} GiB more than the "
                          f"{figures['device_memory_gib']:.1f} GiB per device"), figures
    return "ok", "", figures


def run_layout(opts: SweepOptions, layout: Layout, dcn: Layout, devices: int, index: int,
               tpu: Target | None) -> Row:
    arguments = [opts.config, *opts.overrides, *layout_overrides(layout, dcn)]
    if tpu is not None:
        arguments += ["--topology", opts.topology]
    elif opts.compile_only:
        arguments += ["--compile-only"]
    else:
        arguments += ["--steps", str(opts.steps)]
    status, reason, figures = run_bench(arguments, _child_environment(devices, index, tpu),
                                        opts.timeout_s)
    return Row(with_dcn(layout, dcn), status, reason, figures)


# ---------------------------------------------------------------------------------------------
# The sweep


def device_count(opts: SweepOptions, tpu: Target | None) -> int:
    if tpu is not None:
        return tpu.chips
    if opts.devices:
        return opts.devices
    import jax

    processes = env_int(ENV_NUM_PROCESSES, 0)
    return jax.local_device_count() * processes if processes > 1 else jax.device_count()


def is_reporting_process() -> bool:
    return env_int(ENV_PROCESS_ID, 0) == 0


def ranked(rows: list[Row], compile_only: bool) -> list[tuple[int | None, Row]]:
    """Fastest first (compile only: least memory first), then failures, then the invalid."""
    def key(row: Row) -> float:
        if compile_only:
            return row.figures.get("compiled_per_device_gib", math.inf)
        return -row.figures.get("tokens_per_sec", 0.0)

    ok = sorted((r for r in rows if r.status == "ok"), key=key)
    # Of the failures, those closest to fitting first.
    failed = sorted((r for r in rows if r.status == "failed"),
                    key=lambda r: r.figures.get("required_gib") or math.inf)
    rest = failed + [r for r in rows if r.status in ("invalid", "not run")]
    return [(i + 1, r) for i, r in enumerate(ok)] + [(None, r) for r in rest]


def run_sweep(opts: SweepOptions, progress: Any = None) -> dict[str, Any]:
    cfg = load_config(opts.config, opts.overrides)  # a bad key fails here, once
    tpu = parse_topology(opts.topology) if opts.topology else None
    if tpu is not None and opts.devices and opts.devices != tpu.chips:
        raise ConfigError(f"--devices {opts.devices} does not match --topology {tpu} "
                          f"({tpu.chips} chips)")
    devices = device_count(opts, tpu)
    dcn = {"data": tpu.num_slices} if tpu is not None and tpu.num_slices > 1 else {}
    per_granule = devices // math.prod(dcn.values() or [1])
    layouts = parse_layouts(opts.layouts) if opts.layouts else enumerate_layouts(per_granule,
                                                                                 opts.axes)
    rows: list[Row] = []
    todo: list[Layout] = []
    for layout in layouts:
        reason = layout_problem(cfg, layout, dcn, devices)
        if reason:
            rows.append(Row(with_dcn(layout, dcn), "invalid", reason))
        else:
            todo.append(layout)
    interrupted = False
    for index, layout in enumerate(todo):
        before = len(rows)
        try:
            if progress:
                progress(index, len(todo), layout_label(layout))
            rows.append(run_layout(opts, layout, dcn, devices, index, tpu))
        except KeyboardInterrupt:  # hours of layouts already measured are kept
            interrupted = True
            rows += [Row(with_dcn(rest, dcn), "not run", "the sweep was interrupted")
                     for rest in todo[index + (len(rows) > before):]]
            break
    compile_only = opts.compile_only or tpu is not None
    return {
        "interrupted": interrupted,
        "config": opts.config, "overrides": opts.overrides, "devices": devices,
        "topology": str(tpu) if tpu else None, "compile_only": compile_only,
        "steps": None if compile_only else opts.steps,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": [row.record(rank) for rank, row in ranked(rows, compile_only)],
    }


# ---------------------------------------------------------------------------------------------
# Output


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    plot(result, out / "sweep.png")
    return [out / "sweep.json", out / "sweep.csv", out / "sweep.png"]


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s (when measured) and per-device memory per layout, with the device limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] in ("ok", "failed")]
    labels = [r["layout"] + ("" if r["status"] == "ok" else " (failed)") for r in rows]
    measured = not result["compile_only"]
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 1.2 + 0.45 * max(len(rows), 1)),
                             squeeze=False)
    y = list(range(len(rows)))[::-1]
    if measured:
        ax = axes[0][0]
        ax.barh(y, [r["tokens_per_sec"] or 0 for r in rows], color="tab:blue")
        ax.set_yticks(y, labels)
        ax.set_xlabel("tokens / s")
        ax.set_title("throughput")
    ax = axes[0][-1]
    left = [0.0] * len(rows)
    for part, colour in (("argument_gib", "tab:green"), ("temp_gib", "tab:orange"),
                         ("output_gib", "tab:gray")):
        widths = [r[part] or 0.0 for r in rows]
        if part == "output_gib":  # donated outputs reuse the argument buffers
            widths = [max(w - (r["alias_gib"] or 0.0), 0.0) for w, r in zip(widths, rows,
                                                                              strict=True)]
        ax.barh(y, widths, left=left, color=colour, label=part.removesuffix("_gib"))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    needs = [r["required_gib"] or 0.0 for r in rows]
    if any(needs):  # what the TPU compiler said a layout that does not fit would need
        ax.barh(y, needs, color="none", edgecolor="tab:red", hatch="//",
                label="needed (does not fit)")
    limits = {r["device_memory_gib"] for r in rows if r["device_memory_gib"]}
    for limit in limits:
        ax.axvline(limit, color="tab:red", linestyle="--", label=f"device memory {limit:.1f} GiB")
    ax.set_yticks(y, labels)
    ax.set_xlabel("GiB per device (compiled)")
    ax.set_title("memory per device")
    ax.legend(loc="lower right", fontsize="small")
    where = result["topology"] or f"{result['devices']} devices"
    fig.suptitle(f"llama-jax sweep {result['config']} on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    where = result["topology"] or f"{result['devices']} devices"
    title = (f"llama-jax sweep {result['config']} on {where}"
             + (" (compile only)" if result["compile_only"] else f", {result['steps']} steps"))
    table = Table(title=title)
    columns = ["#", "layout", "compile s", "args GiB", "temp GiB", "total GiB"]
    if any(r["device_memory_gib"] for r in result["rows"]):
        columns.append("of device")
    columns.append("XLA FLOPs/dev")
    if not result["compile_only"]:
        columns += ["step ms", "tokens/s", "MFU"]
    columns.append("status")
    for name in columns:
        table.add_column(name, justify="left" if name in ("layout", "status") else "right")
    for r in result["rows"]:
        # A layout the TPU compiler refused shows the lower bound it reported: "> 160.1".
        total, bound = r["compiled_per_device_gib"], ""
        if total is None and r["required_gib"]:
            total, bound = r["required_gib"], "> "
        cells = [str(r["rank"] or ""), r["layout"], _fmt(r["compile_s"], ".1f"),
                 _fmt(r["argument_gib"], ".3f"), _fmt(r["temp_gib"], ".3f"),
                 bound + _fmt(total, ".3f")]
        if "of device" in columns:
            share = total / r["device_memory_gib"] if total and r["device_memory_gib"] else None
            cells.append(bound + _fmt(share, ".0%"))
        flops = r["xla_flops_per_device"]
        cells.append(_fmt(flops, ".3g"))
        if not result["compile_only"]:
            step = r["step_time_s"]
            cells += [_fmt(step * 1e3 if step else None, ".1f"), _fmt(r["tokens_per_sec"], ",.0f"),
                      _fmt(r["mfu"], ".1%")]
        cells.append(r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}")
        table.add_row(*cells)
    # Captured output (CI logs, a pipe) gets a wide table rather than rich's default 80 columns.
    Console(width=None if sys.stdout.isatty() else 180).print(table)

