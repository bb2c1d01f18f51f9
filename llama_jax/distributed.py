"""Multi-process start-up: explicit coordinator, environment variables, TPU pods and SLURM.

Every process runs the same command. Settings come from `distributed.*` in the config, else
from LLAMA_JAX_COORDINATOR / LLAMA_JAX_NUM_PROCESSES / LLAMA_JAX_PROCESS_ID (what
`llama-jax launch` sets), else JAX's own cluster detection (TPU pod metadata, SLURM) when
`distributed.enabled=auto` finds such an environment. On CPU, collectives go through gloo.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

import jax

from llama_jax.config import DistributedConfig
from llama_jax.errors import LlamaJaxError

ENV_COORDINATOR = "LLAMA_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLAMA_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLAMA_JAX_PROCESS_ID"


def env_int(name: str, default: int) -> int:
    """An integer launch setting from the environment (unset or empty: `default`)."""
    return int(os.environ.get(name, "") or default)


def _cluster_environment() -> bool:
    """A TPU pod slice or a multi-task SLURM job, which JAX detects on its own."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Probe the coordinator's port first: jaxlib aborts the whole process (no Python
    exception) when it cannot connect, which would give no one-line message."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LlamaJaxError(f"distributed: could not join {address} within "
                                    f"{timeout_s}s: {e.strerror or e}") from None
            time.sleep(0.5)


def initialize(d: DistributedConfig) -> bool:
    """Join the job's processes (once); False when this is a single-process run."""
    if jax.distributed.is_initialized():
        return True
    coordinator = d.coordinator or os.environ.get(ENV_COORDINATOR, "")
    num_processes = d.num_processes or env_int(ENV_NUM_PROCESSES, 0)
    process_id = d.process_id if d.process_id >= 0 else env_int(ENV_PROCESS_ID, -1)
    explicit = bool(coordinator) and num_processes > 1
    if d.enabled == "false" or not (explicit or d.enabled == "true" or _cluster_environment()):
        return False
    if "cpu" in (os.environ.get("JAX_PLATFORMS") or "cpu").split(",")[0]:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not d.gloo_logs:
            LineFilter.install(b"[Gloo] ")
    kwargs = {"initialization_timeout": d.timeout_s, "heartbeat_timeout_seconds": d.timeout_s}
    if explicit:
        if process_id < 0:
            raise LlamaJaxError("distributed: a coordinator and num_processes are set but no "
                                "process_id (distributed.process_id or LLAMA_JAX_PROCESS_ID)")
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
        if process_id != 0:
            _wait_for_coordinator(coordinator, d.timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jaxlib raises several kinds for one cause
        where = coordinator or "the detected cluster"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LlamaJaxError(f"distributed: could not join {where} within "
                            f"{d.timeout_s}s: {first}") from None
    return True


class LineFilter:
    """Drops the lines of this process's standard output that start with `prefix`.

    gloo reports each rank's connections from C++ straight to file descriptor 1, one line
    per process (N lines under SLURM), which no Python logging setting reaches. So fd 1 is
    replaced by a pipe; a thread copies what arrives to the real stdout at once, except the
    lines that start with the prefix. Only a line's start is held back, and only while it could
    still be the prefix, so progress bars and prompts pass without waiting for a newline.
    """

    installed: LineFilter | None = None

    @classmethod
    def install(cls, prefix: bytes) -> None:
        if cls.installed is None:
            cls.installed = cls(prefix)

    def __init__(self, prefix: bytes):
        self.prefix = prefix
        sys.stdout.flush()
        self.real = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True,
                                       name="stdout-filter")
        self.thread.start()
        atexit.register(self.close)

    def _pump(self, read: int) -> None:
        pending, dropping, at_start = b"", False, True
        while chunk := os.read(read, 65536):
            pending += chunk
            out = b""
            while pending:
                if dropping or at_start:
                    if at_start and not dropping:
                        head = pending[:len(self.prefix)]
                        if len(head) < len(self.prefix) and self.prefix.startswith(head):
                            break  # not yet known whether this line is one to drop
                        dropping = head == self.prefix
                    if dropping:
                        end = pending.find(b"\n")
                        if end < 0:
                            pending = b""
                            break
                        pending, dropping, at_start = pending[end + 1:], False, True
                        continue
                end = pending.find(b"\n")
                line, pending = ((pending, b"") if end < 0 else
                                 (pending[:end + 1], pending[end + 1:]))
                out += line
                at_start = end >= 0
            if out:
                os.write(self.real, out)
        if pending and not dropping:
            os.write(self.real, pending)
        os.close(read)

    def close(self) -> None:
        """Put the real stdout back (closing the pipe's last writer) and let the thread copy
        what is left."""
        try:
            sys.stdout.flush()
        finally:
            os.dup2(self.real, 1)
            self.thread.join(timeout=10)
