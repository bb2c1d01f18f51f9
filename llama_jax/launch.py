"""`llama-jax launch`: N local processes of one command, joined through a coordinator on
127.0.0.1. Process 0's output is streamed; the others' goes to log files. If any process
fails, the rest are stopped and the launcher exits non-zero naming it (and the log folder,
which is removed after a success); a signal to the launcher goes to every process."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_jax.children import child_environment
from llama_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `train`'s status after a signal made it save and stop (stopping.Preempted): the others
# are stopping at the same step, so they are waited for, and it is not a failure.
STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def launch(command: list[str], processes: int, devices_per_process: int, port: int = 0,
           log_dir: str | None = None) -> int:
    """Start the processes and wait for them. A SIGTERM or Ctrl-C to the launcher is passed on
    to every process and the launcher waits for them to save and stop (`train` agrees on the
    step across processes, stopping.py), then exits with their status."""
    if not command:
        print("llama-jax launch: error: give the command after --", file=sys.stderr)
        return 2
    port = port or free_port()
    logs = Path(log_dir or tempfile.mkdtemp(prefix="llama_jax_launch_"))
    logs.mkdir(parents=True, exist_ok=True)
    code = _run(command, processes, devices_per_process, port, logs)
    if code == 0 and not log_dir:  # kept only for a failure's message to point at
        shutil.rmtree(logs, ignore_errors=True)
    return code


def _run(command: list[str], processes: int, devices_per_process: int, port: int,
         logs: Path) -> int:
    procs: list[subprocess.Popen] = []
    asked: list[int] = []  # signals the launcher received and passed on

    def pass_on(signum: int, frame: object) -> None:
        asked.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(processes):
            env = {**child_environment(signal.SIGTERM),
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
                   ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes),
                   ENV_PROCESS_ID: str(i)}
            out = None if i == 0 else (logs / f"process-{i}.log").open("w")
            with out or contextlib.nullcontext():  # the child holds its own copy
                procs.append(subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *command],
                                              env=env, stdout=out,
                                              stderr=subprocess.STDOUT if out else None))
            if asked:  # a signal while starting: the ones already running have it
                break
        failed = _wait(procs, asked)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if asked or _stopped_on_signal(failed):
        # Stopped on a signal, to the launcher or to one of them: process 0 said where the
        # checkpoint is, their status says which signal (a command with no handler for it
        # was ended by it: the shell's 128 + N).
        code = next((p.returncode for p in procs if p.returncode), 0)
        return 128 - code if code < 0 else code
    if failed:
        i, code = failed[0]
        where = "" if i == 0 else f" (log: {logs / f'process-{i}.log'})"
        print(f"llama-jax launch: error: process {i} exited with status {code}{where}",
              file=sys.stderr)
        return code if code and code > 0 else 1
    return 0


def _stopped_on_signal(failed: list[tuple[int, int]]) -> bool:
    """Whether the processes that ended badly all ended with `train`'s stop status."""
    return bool(failed) and all(code in STOPPED for _, code in failed)


def _wait(procs: list[subprocess.Popen], asked: list[int]) -> list[tuple[int, int]]:
    """Wait for every process; the (index, status) of those that failed. When one fails
    unasked, the others are stopped (they could only wait for it in a collective): SIGTERM,
    then SIGKILL after 30 s. When the launcher was asked to stop, or one stopped on a signal,
    all are waited for as long as they take to save."""
    failed: list[tuple[int, int]] = []
    try:
        while any(p.poll() is None for p in procs):
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.returncode not in (None, 0)]
            if failed and not asked and not _stopped_on_signal(failed):
                break
            time.sleep(0.2)
        failed = failed or [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    finally:
        if not asked and not _stopped_on_signal(failed):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return failed
