"""NVIDIA GPUs by name, and their devices without owning one (ahead-of-time compilation).

XLA:GPU compiles for a GPU described by a target config (its SM count, shared memory, L2,
memory bandwidth, compute capability, cuDNN version) as well as for one it queries, so the
real train step is compiled on a machine with no GPU for, say, two nodes of eight H100s: its
per-GPU memory says whether a layout fits, and its optimised HLO which kernels the step will
launch (fusions, cuDNN attention calls, fp8 GEMMs) and the bytes they move, before a GPU hour
is spent. The compile needs JAX's CUDA plugin (its PJRT library and Python side, ~130 MB;
no CUDA libraries, no driver): `make gpu-compile` puts it beside the environment, where
ordinary runs never load it.

What differs from the program a GPU compiles for itself: with no device to time kernels on,
XLA does not autotune, so each GEMM is a Triton fusion chosen by heuristics where the
autotuner may pick cuBLAS instead (the same FLOPs and fusion boundaries; the tiles differ).
Everything else (fusion, scheduling, buffer assignment) runs as on the GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax.chips import Chip, chip_named
from llama_jax.errors import ConfigError, first_line


@dataclass(frozen=True)
class GpuModel:
    """What XLA's cost model and code generator read of a GPU beyond chips.py's table
    (NVIDIA's datasheets and CUDA occupancy tables: SMs, shared memory, L2, boost clock)."""

    description: str  # as the device reports itself (`device_kind`)
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_units_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    l2_bytes: int
    clock_ghz: float


GPU_MODELS: dict[str, GpuModel] = {
    "h100": GpuModel("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 228 * 1024, 227 * 1024,
                     50 * 2**20, 1.98),
    "h200": GpuModel("NVIDIA H200", (9, 0), 132, 128, 228 * 1024, 227 * 1024, 50 * 2**20, 1.98),
    "a100": GpuModel("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 164 * 1024, 163 * 1024,
                     40 * 2**20, 1.41),
}
# The software the target runs: the CUDA major of the plugin `make gpu-compile` installs and
# a cuDNN that JAX's fused attention accepts on it (packed rows need 9.6 or newer).
CUDA_MAJOR = 13
CUDNN_VERSION = (9, 10, 0)
MAX_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GpuNodes:
    """`nodes` machines of `gpus_per_node` GPUs of one kind; between nodes, the data-center
    network (the `num_slices` of a multi-slice TPU target)."""

    kind: str
    gpus_per_node: int
    nodes: int = 1

    @property
    def chips(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def num_slices(self) -> int:
        return self.nodes

    @property
    def chip(self) -> Chip:
        return chip_named(self.kind)

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    def __str__(self) -> str:
        one = f"{self.kind}:{self.gpus_per_node}"
        return one if self.nodes == 1 else f"{self.nodes} x {one}"


def parse_gpus(kind: str, per_node: str | None, nodes: int, whole: str) -> GpuNodes:
    gpus = int(per_node) if per_node else 1
    if not 1 <= gpus <= MAX_GPUS_PER_NODE:
        raise ConfigError(f"--topology {whole!r}: 1 to {MAX_GPUS_PER_NODE} GPUs per node")
    if nodes < 1:
        raise ConfigError(f"--topology {whole!r}: at least one node")
    return GpuNodes(kind, gpus, nodes)


def target_config(kind: str) -> str:
    """XLA's GpuTargetConfig (text proto) for one GPU of `kind`."""
    model, chip = GPU_MODELS[kind], chip_named(kind)
    major, minor = model.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {model.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {model.sm_count}
  fpus_per_core: {model.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bytes_per_s)}
  l2_cache_size: {model.l2_bytes}
  clock_rate_ghz: {model.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {model.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} patch: {CUDNN_VERSION[2]} }}
runtime_version {{ major: {CUDA_MAJOR} minor: 0 }}
device_description_str: "{model.description}"
"""


ENV_CUDA_PLUGIN = "LLAMA_JAX_CUDA_PLUGIN"


def cuda_plugin_folder() -> Path:
    """Where `make gpu-compile` puts JAX's CUDA plugin: beside the environment, not in it (with
    the plugin importable, every JAX start-up would look for a GPU)."""
    return Path(os.environ.get(ENV_CUDA_PLUGIN) or Path(sys.prefix) / "cuda-plugin")


def cuda_plugin_requirements() -> list[str]:
    """The plugin built for the installed jaxlib: its PJRT library and its Python side."""
    version = importlib.metadata.version("jaxlib")
    return [f"jax-cuda{CUDA_MAJOR}-plugin=={version}", f"jax-cuda{CUDA_MAJOR}-pjrt=={version}"]


def find_cuda_plugin() -> bool:
    """Whether a CUDA plugin can be loaded, putting `cuda_plugin_folder()` on the import path
    if it is there. JAX finds plugins when it is imported, so this runs before that."""
    if any(importlib.util.find_spec(f"jax_cuda{major}_plugin") for major in (12, 13)):
        return True
    folder = cuda_plugin_folder()
    if (folder / "jax_plugins").is_dir():
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        return True
    return False


def compile_only_environment() -> dict[str, str]:
    """Set before JAX starts: the CPU is the runtime backend (there is no GPU to start), and
    the plugin skips its check of the local CUDA libraries and driver, which a compile for a
    described GPU does not use."""
    return {"JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}


def answer_cudnn_checks(kind: str) -> None:
    """JAX's fused attention asks the local cuDNN for its version and the local backend's
    first GPU for its compute capability before it lowers; with no GPU here both questions
    concern the target (a GPU of `kind` with CUDNN_VERSION), so the target answers them. Only
    for processes that compile for a described GPU or trace without running."""
    model = GPU_MODELS[kind]
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:  # a JAX without it has no cuDNN attention to lower
        return
    major, minor, patch = CUDNN_VERSION
    capability = model.compute_capability

    def at_least(text: str) -> bool:
        return capability >= tuple(int(x) for x in text.split("."))

    def equal(text: str) -> bool:
        return capability == tuple(int(x) for x in text.split("."))

    for name, answer in (("check_cudnn_version", lambda: major * 10000 + minor * 100 + patch),
                         ("check_compute_capability", at_least),
                         ("is_cuda_compute_capability_equal", equal)):
        if hasattr(fused, name):
            setattr(fused, name, answer)


def gpu_devices(target: GpuNodes) -> list[Any]:
    """Compile-only devices of the target's GPUs: they compile programs but run nothing."""
    if not find_cuda_plugin():
        raise ConfigError(f"--topology {target} needs JAX's CUDA plugin, which the default "
                          f"install leaves out: run `make gpu-compile`")
    for key, value in compile_only_environment().items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    answer_cudnn_checks(target.kind)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(target.kind),
            topology=f"1x{target.nodes}x{target.gpus_per_node}")
    except Exception as e:  # noqa: BLE001 - the plugin reports its errors as runtime errors
        raise ConfigError(f"the CUDA plugin could not describe {target}: {first_line(e)} (JAX must "
                          f"find the plugin when it starts: `make gpu-compile`)") from None
    return list(topology.devices)


if __name__ == "__main__":  # `make gpu-compile` asks which plugin matches this jaxlib
    print(" ".join(cuda_plugin_requirements()))
