"""Parameter counts, training FLOPs per token, MFU and state memory.

Training FLOPs per token (forward x 3: one forward, two for the backward), per layer:
    qkv projections      2 * D * (N + 2K) * H
    output projection    2 * N * H * D
    attention            2 * S * N * H        (QK^T and AV are 4*S*N*H; causal: half)
    MLP                  2 * D * F * m        (m = 3 for SwiGLU, 2 for GELU)
plus the LM head 2 * D * V once. Embedding lookups, norms, RoPE and softmax are not counted
(MaxText's convention), so MFU compares against dense matmul peak honestly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from llama_jax.chips import chip_of_kind
from llama_jax.config import Config, ModelConfig
from llama_jax.model import abstract_model
from llama_jax.optim import decay_mask, make_optimizer
from llama_jax.storage import replace_text


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_size
    mlp_mats = 3 if cfg.activation == "swiglu" else 2
    per_layer = (
        2 * d * (n + 2 * k) * h
        + 2 * n * h * d
        + 2 * seq_len * n * h
        + 2 * d * cfg.intermediate_size * mlp_mats
    )
    forward = cfg.num_layers * per_layer + 2 * d * cfg.vocab_size
    return 3.0 * forward


@dataclass
class ParamCounts:
    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Exact counts from an abstract init: no parameter is allocated."""
    state = nnx.state(abstract_model(cfg))
    total, embedding = 0, 0
    for _, leaf in nnx.to_flat_state(state):
        size = math.prod(leaf.get_value().shape)
        total += size
        if leaf.get_metadata().get("embedding", False):  # tables and the LM head
            embedding += size
    return ParamCounts(total, embedding)


def state_bytes(cfg: Config) -> dict[str, int]:
    """Bytes of parameters and of the optimizer state, from abstract shapes."""
    state = nnx.state(abstract_model(cfg.model))
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(state))
    opt_state = jax.eval_shape(tx.init, params)

    def nbytes(tree: object) -> int:
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    p, o = nbytes(params), nbytes(opt_state)
    return {"params": p, "optimizer": o, "total": p + o}


def chip_peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 datasheet peak of an accelerator chip (chips.py), None elsewhere."""
    chip = chip_of_kind(device.device_kind) if device.platform != "cpu" else None
    return chip.peak_flops if chip else None


def best_seconds(program: Any, argument: jax.Array, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed (compiling) call."""
    program(argument).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        program(argument).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul rate of this host through JAX: the CPU 'peak' for MFU."""
    device = jax.local_devices(backend="cpu")[0]
    host = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n**3 / best_seconds(jax.jit(lambda x: x @ x), jax.device_put(host, device),
                                    repeats)


def platform_peak_flops(devices: list[jax.Device] | None = None, keep_in: str = ""
                        ) -> tuple[float, str]:
    """Total peak FLOP/s of the devices in use, and where the figure comes from.

    Accelerators: datasheet dense bf16 peak per chip x chips. CPU: one matmul measured in this
    process, for the whole host (simulated CPU devices share the same cores); with `keep_in`
    (a folder: `train`'s compilation cache), measured once per host and read back after, as
    the measurement costs each start a second.
    """
    devices = devices or jax.devices()
    peak = chip_peak_flops(devices[0])
    if peak is not None:
        return peak * len(devices), f"{devices[0].device_kind} datasheet x {len(devices)}"
    if devices[0].platform == "cpu":
        source = "measured float32 2048^3 matmul on this host"
        if keep_in:
            return _kept_measurement(epath.Path(keep_in) / PEAK_FILE), f"{source} (kept)"
        return measured_matmul_flops(), source
    return float("nan"), f"unknown peak for {devices[0].device_kind}"


PEAK_FILE = "llama_jax-cpu-peak-flops.json"  # beside JAX's entries, which end in -cache


def _kept_measurement(path: epath.Path) -> float:
    """`measured_matmul_flops` of this host, from `path` (one figure per host, CPU count,
    XLA flags and JAX version) or measured and added to it. The file is only a convenience:
    unreadable, it is measured again; unwritable, the figure is not kept."""
    key = (f"{socket.gethostname()} cpus={os.cpu_count()} jax={jax.__version__} "
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    kept: dict[str, float] = {}
    try:
        loaded = json.loads(path.read_text())
        kept = loaded if isinstance(loaded, dict) else {}
        return float(kept[key])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    peak = measured_matmul_flops()
    try:
        replace_text(path, json.dumps({**kept, key: peak}, indent=1))
    except OSError:
        pass
    return peak


def mfu(tokens_per_sec: float, flops_token: float, peak: float) -> float:
    return tokens_per_sec * flops_token / peak if peak and math.isfinite(peak) else float("nan")
