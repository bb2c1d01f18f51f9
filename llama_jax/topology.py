"""TPU slices by name, and their devices without owning them (ahead-of-time compilation).

`libtpu` can describe any slice's devices to the compiler on a machine that has no TPU, so the
real train step is compiled for, say, a v5p-128 from a laptop: its per-chip memory then says
whether a layout fits before any TPU hour is spent. Only the compile needs libtpu (the optional
`tpu` extra); naming and sizing a slice does not.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_jax import gpu_target
from llama_jax.chips import Chip, chip_named
from llama_jax.errors import ConfigError
from llama_jax.gpu_target import GpuNodes

# Per generation: whether a chip is one "megacore" device that the slice name counts as two
# TensorCores (v4, v5p), and its torus rank. HBM, peak and bandwidths: chips.py.
_GENERATIONS: dict[str, dict[str, Any]] = {
    "v4": {"cores_per_chip": 2, "rank": 3},
    "v5p": {"cores_per_chip": 2, "rank": 3},
    "v5e": {"cores_per_chip": 1, "rank": 2},
    "v6e": {"cores_per_chip": 1, "rank": 2},
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}

_SHAPE = re.compile(r"^(?P<gen>v\w+?):(?P<shape>\d+(x\d+)+)$")
_SLICE = re.compile(r"^(?P<gen>v\w+?)-(?P<cores>\d+)$")
_MULTI = re.compile(r"^(?P<n>\d+)x(?P<rest>[a-z].+)$")
_GPUS = re.compile(rf"^(?P<kind>{'|'.join(gpu_target.GPU_MODELS)})(:(?P<gpus>\d+))?$")


@dataclass(frozen=True)
class TpuSlice:
    """`num_slices` identical slices of `shape` chips (multi-slice: joined over DCN)."""

    generation: str
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chip(self) -> Chip:
        return chip_named(self.generation)

    @property
    def hbm_bytes(self) -> int:
        return self.chip.hbm_bytes

    def __str__(self) -> str:
        one = self.topology_name
        return one if self.num_slices == 1 else f"{self.num_slices} x {one}"


def _generation(name: str, whole: str) -> str:
    gen = _ALIASES.get(name, name)
    if gen not in _GENERATIONS:
        raise ConfigError(f"unknown TPU generation {name!r} in --topology {whole!r}; known: "
                          f"{', '.join(sorted(_GENERATIONS))}")
    return gen


def _default_shape(gen: str, chips: int, whole: str) -> tuple[int, ...]:
    """The standard slice shape for a chip count: grow the smallest side, the last on ties
    (v5p-16 -> 2x2x2, v5p-128 -> 4x4x8, v5e-256 -> 16x16)."""
    rank = _GENERATIONS[gen]["rank"]
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"--topology {whole!r}: {chips} chips is not a power of two")
    shape = [2, 2, 1] if rank == 3 and chips >= 4 else [1] * rank
    if math.prod(shape) > chips:
        raise ConfigError(f"--topology {whole!r}: a {gen} slice has at least 4 chips")
    while math.prod(shape) < chips:
        smallest = min(shape)
        index = max(i for i, s in enumerate(shape) if s == smallest)
        shape[index] *= 2
    return tuple(shape)


Target = TpuSlice | GpuNodes  # what `--topology` compiles for


def parse_topology(name: str) -> Target:
    """`v5p:2x2x2`, a slice name (`v5p-16`, `v4-32`, `v5e-256`, `v6e-64`; v4/v5p names count
    TensorCores, two per chip) or a multi-slice `2xv5p-128`; or GPUs: `h100` (one), `h200:8`
    (one node of eight), `2xh100:8` (two such nodes)."""
    text = name.strip().lower()
    slices = 1
    if multi := _MULTI.match(text):
        slices, text = int(multi["n"]), multi["rest"]
    if m := _GPUS.match(text):
        return gpu_target.parse_gpus(m["kind"], m["gpus"], slices, name)
    if m := _SHAPE.match(text):
        gen = _generation(m["gen"], name)
        shape = tuple(int(s) for s in m["shape"].split("x"))
        if len(shape) != _GENERATIONS[gen]["rank"]:
            raise ConfigError(f"--topology {name!r}: a {gen} slice has "
                              f"{_GENERATIONS[gen]['rank']} dimensions")
        return TpuSlice(gen, shape, slices)
    if m := _SLICE.match(text):
        gen = _generation(m["gen"], name)
        cores = int(m["cores"])
        per_chip = _GENERATIONS[gen]["cores_per_chip"]
        if cores % per_chip:
            raise ConfigError(f"--topology {name!r}: {gen} slice names count TensorCores, "
                              f"{per_chip} per chip")
        return TpuSlice(gen, _default_shape(gen, cores // per_chip, name), slices)
    raise ConfigError(f"cannot read --topology {name!r}: expected e.g. v5p:2x2x2, v5p-16, "
                      f"v5e-256, 2xv5p-128, h100, h200:8 or 2xh100:8")


ENV_LIBTPU = "LLAMA_JAX_LIBTPU"


def libtpu_folder() -> Path:
    """Where `make tpu` puts libtpu: beside the environment, not in it, so that ordinary runs
    never see it (with libtpu importable, JAX probes for a TPU at every start-up)."""
    return Path(os.environ.get(ENV_LIBTPU) or Path(sys.prefix) / "libtpu")


def find_libtpu() -> bool:
    """Whether libtpu can be loaded, putting `libtpu_folder()` on the import path if it is
    there."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    folder = libtpu_folder()
    if (folder / "libtpu").is_dir():
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        return True
    return False


def libtpu_requirement() -> str:
    """The libtpu that the installed JAX's own `tpu` extra pins (`libtpu==0.0.42.*`)."""
    for requirement in importlib.metadata.requires("jax") or []:
        name, _, marker = requirement.partition(";")
        if name.strip().startswith("libtpu") and '"tpu"' in marker:
            return name.replace(" ", "")
    return "libtpu"


def compile_only_environment(target: Target) -> dict[str, str]:
    """Set before JAX starts, for compiling for `target`."""
    if isinstance(target, GpuNodes):
        return gpu_target.compile_only_environment()
    return _tpu_compile_only_environment()


def prepare_compile_only(name: str) -> Target:
    """The target `--topology name` names, with this process set up to compile for it: its
    environment, and for GPUs the CUDA plugin on the import path. Before JAX is imported:
    JAX finds its plugins then."""
    target = parse_topology(name)
    for key, value in compile_only_environment(target).items():
        os.environ.setdefault(key, value)
    if isinstance(target, GpuNodes):
        gpu_target.find_cuda_plugin()
    return target


def _tpu_compile_only_environment() -> dict[str, str]:
    """Set before JAX starts: the CPU is the runtime backend, libtpu must not look for a TPU or
    its metadata server on this machine, and several compiles may load libtpu at once (it
    otherwise takes a lock file meant for processes sharing one TPU host). The host's own
    accelerator type and worker names are given (one v5p host, this machine) only so that
    libtpu's start-up does not print five lines of warnings about them: the slice compiled
    for is described explicitly (`topology_devices`)."""
    return {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"}


def topology_devices(tpu: Target) -> list[Any]:
    """Compile-only devices of the slice(s) or GPUs: they compile programs but run nothing."""
    if isinstance(tpu, GpuNodes):
        return gpu_target.gpu_devices(tpu)
    if not find_libtpu():
        raise ConfigError("--topology needs libtpu, which the default install leaves out: "
                          "run `make tpu` (or pip install -e '.[tpu]')")
    for key, value in _tpu_compile_only_environment().items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if _GENERATIONS[tpu.generation]["cores_per_chip"] == 2:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX sees a v4/v5p
    if tpu.chips_per_slice < 4:
        kwargs["chips_per_host_bounds"] = (*tpu.shape, 1)[:3]
    if tpu.num_slices > 1:
        kwargs["num_slices"] = tpu.num_slices
    try:
        topology = topologies.get_topology_desc(topology_name=tpu.topology_name,
                                                platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad shapes as runtime errors
        raise ConfigError(f"libtpu refused topology {tpu}: {str(e).splitlines()[0]}") from None
    return list(topology.devices)


if __name__ == "__main__":  # `make tpu` asks which libtpu matches this JAX
    print(libtpu_requirement())
