"""Goodput: where a run's wall time went, over every session (start or restart) of its run
directory.

Each `train` session keeps a `Clock`: at any moment it is in exactly one phase (starting,
restoring, taking a step, waiting for data, saving a checkpoint, evaluating), and the wall
time between phase changes is added to that phase, less the compilation that JAX reported
within it (`compile_cache.CompileLog`), which is counted as compilation. So the phases add up
to the session's wall time. Time is the host's view: with asynchronous dispatch, device work
that overlaps data loading or a save is counted where the host waited.

A session writes its running totals as a `{"kind": "goodput", ...}` row of metrics.jsonl at
every logging step and at its end. Those rows survive a resume (other rows after the resume
step are dropped), and the last one of each session is its account. Steps a session took
beyond the checkpoint the next session resumed from were computed again: their time moves from
productive to "lost to restarts", as do steps undone by a rollback. A SIGKILLed session's
time after its last row is not known and not counted.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from etils import epath

from llama_jax.compile_cache import CompileLog
from llama_jax.errors import LlamaJaxError
from llama_jax.storage import json_rows

PHASES = ("step", "compile", "data_wait", "checkpoint", "evaluation", "restore", "startup")
LABELS = {
    "step": "productive steps",
    "compile": "compilation",
    "data_wait": "waiting for data",
    "checkpoint": "checkpoint saving (blocking)",
    "evaluation": "evaluation",
    "restore": "restore / initialise",
    "startup": "start-up (config, data, mesh)",
    "lost": "lost to restarts (steps computed again)",
}
KIND = "goodput"


class Clock:
    """One session's phases. `enter(phase)` closes the current phase and opens another."""

    def __init__(self, session: int, first_step: int, started: float):
        self.session, self.first_step = session, first_step
        self.started = started
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.recomputed = 0  # steps undone by rollbacks in this session
        self.phase, self.since = "startup", started
        self.compiles = CompileLog.get()
        self.first_step_s: float | None = None  # its end, seconds after the start
        self.ready_s: float | None = None  # its beginning: compiled (or loaded), batch at hand

    def enter(self, phase: str) -> None:
        now = time.time()
        compiling = self.compiles.seconds_between(self.since, now)
        self.compiles.forget_before(now)
        self.seconds[self.phase] += max(0.0, now - self.since - compiling)
        self.seconds["compile"] += compiling
        self.phase, self.since = phase, now

    def first_step_done(self, ready_at: float) -> None:
        """The session's first step ended now; it could begin at `ready_at` (a time.time())."""
        if self.first_step_s is None:
            self.first_step_s = time.time() - self.started
            self.ready_s = ready_at - self.started

    def row(self, step: int, status: str) -> dict[str, Any]:
        """The session's account so far (the current phase closed at this moment)."""
        self.enter(self.phase)
        return {"kind": KIND, "session": self.session, "status": status,
                "started": self.started, "updated": time.time(), "first_step": self.first_step,
                "step": step, "recomputed_steps": self.recomputed,
                "first_step_s": self.first_step_s, "ready_s": self.ready_s,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def is_goodput(row: dict[str, Any]) -> bool:
    return row.get("kind") == KIND


def next_session(metrics_path: epath.Path) -> int:
    return 1 + max((r["session"] for r in _rows(metrics_path)), default=0)


def _rows(metrics_path: epath.Path) -> list[dict[str, Any]]:
    return [row for row in json_rows(metrics_path) if is_goodput(row)]


def sessions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row of each session, in session order."""
    last: dict[int, dict[str, Any]] = {}
    for row in rows:
        last[row["session"]] = row
    return [last[k] for k in sorted(last)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per phase summed over sessions, with recomputed steps moved to "lost"."""
    accounts = sessions(rows)
    totals = dict.fromkeys((*PHASES, "lost"), 0.0)
    recomputed = 0
    for i, s in enumerate(accounts):
        seconds = dict(s["seconds"])
        steps = s["step"] - s["first_step"] + s["recomputed_steps"]
        again = s["recomputed_steps"]
        if i + 1 < len(accounts):  # the next session went back to its first step
            again += max(0, s["step"] - max(accounts[i + 1]["first_step"], s["first_step"]))
        if steps > 0 and again:
            lost = seconds["step"] * min(again, steps) / steps
            seconds["step"] -= lost
            totals["lost"] += lost
        recomputed += again
        for k in PHASES:
            totals[k] += seconds.get(k, 0.0)
    wall = sum(totals.values())
    gaps = [max(0.0, b["started"] - a["updated"]) for a, b in itertools.pairwise(accounts)]
    return {
        "wall_s": wall,
        "goodput": totals["step"] / wall if wall > 0 else None,
        "seconds": totals,
        "sessions": len(accounts),
        "steps": accounts[-1]["step"] if accounts else 0,
        "recomputed_steps": recomputed,
        "between_sessions_s": sum(gaps),
    }


def report(run_dir: epath.Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise LlamaJaxError(f"{run_dir}: no such run directory")
    rows = _rows(run_dir / "metrics.jsonl")
    if not rows:
        raise LlamaJaxError(f"{run_dir}: no goodput rows in metrics.jsonl (not a run directory, "
                            f"or written before goodput was recorded)")
    return summarize(rows)


def table(summary: dict[str, Any], title: str):  # noqa: ANN201 - rich Table
    from rich.table import Table

    t = Table(title=title)
    t.add_column("where the time went")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    wall = summary["wall_s"] or 1.0
    for key in ("step", "compile", "data_wait", "checkpoint", "evaluation", "restore",
                "startup", "lost"):
        seconds = summary["seconds"][key]
        t.add_row(LABELS[key], f"{seconds:,.1f}", f"{seconds / wall:.1%}")
    t.add_row("[bold]wall time", f"[bold]{summary['wall_s']:,.1f}", "")
    return t


def headline(summary: dict[str, Any]) -> str:
    """The line under the table (a table caption would wrap to the table's width)."""
    goodput = summary["goodput"]
    return (f"goodput {goodput:.1%}" if goodput is not None else "no time recorded") + (
        f" over {summary['sessions']} session(s) to step {summary['steps']}; "
        f"{summary['recomputed_steps']} step(s) computed again; "
        f"{summary['between_sessions_s']:,.0f} s between sessions (not counted)")
