"""Multi-process start-up: explicit coordinator, environment variables, TPU pods and SLURM.

Every process runs the same command. Settings come from `distributed.*` in the config, else
from LLAMA_JAX_COORDINATOR / LLAMA_JAX_NUM_PROCESSES / LLAMA_JAX_PROCESS_ID (what
`llama-jax launch` sets), else JAX's own cluster detection (TPU pod metadata, SLURM) when
`distributed.enabled=auto` finds such an environment. On CPU, collectives go through gloo.
"""

from __future__ import annotations

import os
import socket
import time

import jax

from llama_jax.config import DistributedConfig
from llama_jax.errors import LlamaJaxError, brief
from llama_jax.output_filter import FatalReport, LineFilter

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
        first = brief(e, 200)
        raise LlamaJaxError(f"distributed: could not join {where} within "
                            f"{d.timeout_s}s: {first}") from None
    FatalReport.install(jax.process_index())
    return True
