"""What one device can do per second, and the step time a compiled program's cost predicts.

Accelerators: the chip table (chips.py): datasheet peak, HBM and interconnect bandwidth, at
every size. CPU devices (real, or simulated ones sharing the host's cores): measured here, with
all of them running at once (each simulated device is a thread; what one gets depends on the
others), inside a loop (so the call's own dispatch is not counted), and memory at several
sizes: a pass over 64 KiB in cache runs several times faster than one over 16 MiB. A
program's kernels, binned by the size of their work (`hlo_cost.size_class`), are charged at
the rate measured for the nearest size. A single 64 MiB copy, timed as one call, had put the
CPU's memory term 5-15x too high for a small model (docs/planning.md).

    python -m llama_jax.roofline DEVICES    # the measured CPU roofline of DEVICES devices, JSON

(`plan` runs it in a process of its own, where the simulated devices exist.)
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from llama_jax.chips import Chip, chip_of_kind
from llama_jax.flops import best_seconds

Rates = tuple[tuple[float, float], ...]  # (size of one instruction's work, rate per second)


@dataclass(frozen=True)
class Roofline:
    """Per device."""

    peak_flops: float
    memory_bytes_per_s: float
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    source: str
    memory_rates: Rates = ()  # by bytes per kernel; none: memory_bytes_per_s
    collective_latency_s: float = 0.0  # per collective, beyond its bytes (CPU: measured)
    fp8_peak_flops: float = 0.0  # 0: fp8 matmuls run at `peak_flops` (no fp8 units)

    def compute_seconds(self, flops: float, fp8_flops: float = 0.0) -> float:
        """Matmul FLOPs at peak, `fp8_flops` of them at the fp8 peak: priced at the bf16 one,
        an fp8 step looked slower than bf16 by its scaling passes alone."""
        return (flops - fp8_flops) / self.peak_flops \
            + fp8_flops / (self.fp8_peak_flops or self.peak_flops)

    def kernel_seconds(self, kernels: Mapping[str, Sequence[float]]) -> float:
        """The roofline per kernel, summed: kernels run one after another, each bound by its
        matmul work or its memory traffic, whichever is slower (memory at its size's rate).
        `kernels`: `hlo_cost.Cost.kernels`, `"flops_class:bytes_class[:f8]" -> [FLOPs, bytes,
        kernels run, fp8 FLOPs]`."""
        total = 0.0
        for key, amounts in kernels.items():
            flops, moved = amounts[0], amounts[1]
            fp8 = amounts[3] if len(amounts) > 3 else 0.0
            bytes_class = float(key.split(":")[1])
            total += max(self.compute_seconds(flops, fp8),
                         moved / _rate(self.memory_rates, bytes_class, self.memory_bytes_per_s))
        return total

    def step_seconds(self, figures: Mapping[str, Any]) -> float:
        """From `bench`'s figures of a compiled program: its kernels (at least the model's
        FLOPs at peak, `model_flops_per_device`), then its collectives, which are added rather
        than assumed hidden: an XLA step waits for its gradient reductions and weight gathers
        in large part, and a pessimistic collective term ranks layouts that avoid them
        first."""
        model = figures.get("model_flops_per_device") or 0.0
        fp8_share = (figures.get("hlo_fp8_flops_per_device") or 0.0) \
            / max(figures.get("hlo_flops_per_device") or 0.0, 1.0)
        kernels = max(self.kernel_seconds(figures.get("hlo_kernels") or {}),
                      self.compute_seconds(model, model * fp8_share))
        return (kernels
                + figures.get("ici_bytes_per_device", 0.0) / self.ici_bytes_per_s
                + figures.get("dcn_bytes_per_device", 0.0) / self.dcn_bytes_per_s
                + figures.get("collective_ops", 0.0) * self.collective_latency_s)

    @property
    def measured(self) -> bool:
        return bool(self.memory_rates)

    def best_of(self, other: Roofline) -> Roofline:
        """The faster of two measurements of the same devices, figure by figure: on a shared
        host one measurement read half the matmul rate of another taken an hour before."""
        rates = dict(self.memory_rates)
        for size, rate in other.memory_rates:
            rates[size] = max(rate, rates.get(size, 0.0))
        return Roofline(
            max(self.peak_flops, other.peak_flops),
            max(self.memory_bytes_per_s, other.memory_bytes_per_s),
            max(self.ici_bytes_per_s, other.ici_bytes_per_s),
            max(self.dcn_bytes_per_s, other.dcn_bytes_per_s), self.source + " (best of two)",
            tuple(sorted(rates.items())),
            min(self.collective_latency_s, other.collective_latency_s),
            max(self.fp8_peak_flops, other.fp8_peak_flops))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Roofline:
        return Roofline(**{**data, "memory_rates": tuple(tuple(r) for r in
                                                          data.get("memory_rates", ()))})


def _rate(rates: Rates, size: float, default: float) -> float:
    """The rate measured at the size nearest `size` (on a log scale); `default` if none."""
    if not rates:
        return default
    return min(rates, key=lambda r: abs(math.log(r[0]) - math.log(max(size, 1.0))))[1]


def of_chip(chip: Chip) -> Roofline:
    return Roofline(chip.peak_flops, chip.hbm_bytes_per_s, chip.ici_bytes_per_s,
                    chip.dcn_bytes_per_s, f"{chip.name}: {chip.source}",
                    fp8_peak_flops=chip.fp8_peak_flops or 0.0)


def chip_roofline(device_kind: str) -> Roofline | None:
    chip = chip_of_kind(device_kind)
    return of_chip(chip) if chip else None


def roofline(devices: list[jax.Device]) -> Roofline | None:
    """The chip table's figures for an accelerator, the measured ones for CPU devices; None
    for an unknown chip."""
    if devices[0].platform == "cpu":
        return measured_cpu_roofline(devices)
    return chip_roofline(devices[0].device_kind)


MATMUL_SIZE = 768  # n of the n x n x n matmul per device
MEMORY_SIZES = (2**16, 2**20, 2**24)  # bytes per device of a read-and-write pass
ALL_REDUCE_SIZE = 2**22  # bytes per device


_measured: dict[tuple[int, ...], Roofline] = {}


def measured_cpu_roofline(devices: list[jax.Device], repeats: int = 5) -> Roofline:
    """Every device at once, each on its own block of a sharded array, in a loop of several
    trips (the best of `repeats` runs): a matmul (one size: in a loop, 64^3 to 768^3 ran at
    the same rate within this machine's noise, and rates by size read noise as speed), passes
    over memory at three sizes (their rates differ 5x: caches), and all-reduces of 8 floats
    (the latency) and of 4 MiB (the bandwidth, net of the latency: the simulated devices'
    collectives run at a quarter of their memory rate)."""
    key = tuple(d.id for d in devices)
    if key in _measured:
        return _measured[key]
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(devices)
    spread = NamedSharding(Mesh(np.array(devices), ("device",)), PartitionSpec("device"))

    def per_trip(body: Any, host: np.ndarray, guess_s: float) -> float:
        """Seconds per trip of a loop running `body` on every device's block of `host`, with
        about 0.2 s per run if one trip takes about `guess_s`."""
        trips = int(min(4096, max(2, 0.2 / guess_s)))
        program = jax.jit(lambda x: jax.lax.fori_loop(0, trips, lambda _, v: body(v), x),
                          out_shardings=spread)
        return best_seconds(program, jax.device_put(host, spread), repeats) / trips

    size = MATMUL_SIZE
    host = (np.random.default_rng(0).standard_normal((n, size, size))
            / math.sqrt(size)).astype(np.float32)
    flops = 2.0 * size**3
    peak = flops / per_trip(lambda v: jax.numpy.einsum("dmk,dkn->dmn", v, v) * 0.5, host,
                            n * flops / 50e9)
    memory = []
    for size in MEMORY_SIZES:
        seconds = per_trip(lambda v: v * 0.999 + 0.001, np.ones((n, size // 4), np.float32),
                           n * 2 * size / 20e9)
        memory.append((2.0 * size, 2.0 * size / seconds))

    def all_reduce(size: int, guess_s: float) -> float:
        return per_trip(lambda v: v * 0.5 + v.sum(axis=0, keepdims=True) * 0.01,
                        np.ones((n, size // 4), np.float32), guess_s)

    latency = all_reduce(32, 3e-4)
    sent = 2 * (n - 1) / n * ALL_REDUCE_SIZE  # what hlo_cost charges an all-reduce
    ici = sent / max(all_reduce(ALL_REDUCE_SIZE, 1e-2) - latency, 1e-9)
    found = Roofline(
        peak_flops=peak, memory_bytes_per_s=memory[-1][1], ici_bytes_per_s=ici,
        dcn_bytes_per_s=ici,
        source=(f"measured on this host with {n} CPU devices at once: a {MATMUL_SIZE}^3 "
                f"matmul, passes over {'/'.join(f'{s // 2**10} KiB' for s in MEMORY_SIZES)},"
                f" all-reduces"),
        memory_rates=tuple(memory), collective_latency_s=latency)
    _measured[key] = found
    return found


if __name__ == "__main__":  # plan: the CPU roofline of N simulated devices, in this process
    from llama_jax.children import end_with_parent

    end_with_parent()
    print(json.dumps(measured_cpu_roofline(jax.devices()[:int(sys.argv[1])]).to_json()))
