"""XLA:CPU workarounds, in one place: compile options measured to help the train step, and
synchronous dispatch where XLA:CPU's in-process collectives would otherwise deadlock.
Accelerators get neither."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

# XLA:CPU options for the training step, each measured (docs/performance.md).
CPU_COMPILER_OPTIONS = {
    # Copy insertion by region analysis (XLA's GPU default): fewer copies of the stacked
    # per-layer buffers that a scanned layer loop carries.
    "xla_cpu_copy_insertion_use_region_analysis": True,
}


@functools.cache
def _options_accepted(device: jax.Device) -> bool:
    """Whether this jaxlib knows the options: an unknown name fails every compile."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jax.device_put(np.zeros((), np.float32), device)).compile()
    except Exception:  # noqa: BLE001 - XLA's INVALID_ARGUMENT ("No such compile option")
        return False
    return True


def compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    device = mesh.devices.flat[0]
    if device.platform == "cpu" and _options_accepted(device):
        return CPU_COMPILER_OPTIONS
    return None


def synchronous_on_cpu(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """On a CPU mesh, wait for each call's results before returning.

    XLA:CPU (jaxlib 0.10) deadlocks in its in-process collectives when a computation with
    collectives is dispatched while the previous one is still running on simulated devices
    (reproduced with a tiny jitted matmul-and-sum over 8 devices on 2 cores: it hangs within
    ~100 calls with async dispatch, and also with `jax_cpu_enable_async_dispatch=False`, but
    never when each call's result is awaited). On CPU the host is the device, so waiting costs
    no overlap; accelerators keep asynchronous dispatch.
    """
    if mesh.devices.flat[0].platform != "cpu" or mesh.size == 1:
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return jax.block_until_ready(fn(*args, **kwargs))

    if hasattr(fn, "lower"):  # AOT compile stays available
        wrapped.lower = fn.lower  # type: ignore[attr-defined]
    return wrapped
