"""`llama-jax launch`: N local processes of one command, joined through a coordinator on
127.0.0.1. Process 0's output is streamed; the others' goes to log files. If any process
fails, the rest are stopped and the launcher exits non-zero naming it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], processes: int, devices_per_process: int, port: int = 0,
           log_dir: str | None = None) -> int:
    if not command:
        print("llama-jax launch: error: give the command after --", file=sys.stderr)
        return 2
    port = port or free_port()
    logs = Path(log_dir or tempfile.mkdtemp(prefix="llama_jax_launch_"))
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for i in range(processes):
        env = {**os.environ,
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
               ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes),
               ENV_PROCESS_ID: str(i)}
        out = None if i == 0 else (logs / f"process-{i}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *command],
                                      env=env, stdout=out, stderr=subprocess.STDOUT if out
                                      else None))
    failed: list[tuple[int, int]] = []
    try:
        while any(p.poll() is None for p in procs):
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.returncode not in (None, 0)]
            if failed:
                break
            time.sleep(0.2)
        failed = failed or [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if failed:
        i, code = failed[0]
        where = "" if i == 0 else f" (log: {logs / f'process-{i}.log'})"
        print(f"llama-jax launch: error: process {i} exited with status {code}{where}",
              file=sys.stderr)
        return code if code and code > 0 else 1
    return 0
