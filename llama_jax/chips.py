"""Per-chip constants for MFU, memory checks and `plan`'s roofline, in one table with sources.

`ici_bytes_per_s` is what one device can send on one mesh axis when a collective runs as a
ring in both directions: on a TPU torus two links (each link's bidirectional rate), on an
NVLink GPU its whole NVLink rate (one way: half the quoted bidirectional figure). A CPU's
simulated devices share one host: its peak and memory bandwidth are measured on the host
(`flops.platform_peak_flops`, `host_copy_bytes_per_s`) and divided among them.

Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e:
peak bf16, HBM, HBM bandwidth, DCN); the JAX scaling book ("How to think about TPUs",
jax-ml.github.io/scaling-book: ICI bandwidth per link); NVIDIA's H100/H200/A100 datasheets
(dense bf16 and fp8 without sparsity, HBM, memory bandwidth, NVLink), 400 Gb/s InfiniBand per
GPU as the GPU's DCN.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    kinds: tuple[str, ...]  # lower-case substrings of jax's `device_kind`
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one device, one mesh axis (see the module docstring)
    dcn_bytes_per_s: float  # one device, between slices or nodes
    source: str
    # Dense FP8 FLOP/s where the chip multiplies fp8 in hardware; None where XLA upcasts an
    # fp8 matmul's operands and it runs at the bf16 rate.
    fp8_peak_flops: float | None = None


CHIPS: tuple[Chip, ...] = (
    Chip("v4", ("v4",), 275e12, 32 * GiB, 1.2e12, 2 * 9e10, 6.25e9,
         "Cloud TPU v4 page; scaling book: ICI 4.5e10 B/s per link one way"),
    Chip("v5p", ("v5p", "v5"), 459e12, int(95.74 * GiB), 2.765e12, 2 * 2e11, 6.25e9,
         "Cloud TPU v5p page: 459 TFLOP/s, 95 GiB, 2,765 GB/s, ICI 1,200 GB/s per chip "
         "bidirectional over 6 links, DCN 50 Gb/s per chip"),
    Chip("v5e", ("v5 lite", "v5e", "v5litepod"), 197e12, 16 * GiB, 8.19e11, 2 * 9e10, 6.25e9,
         "Cloud TPU v5e page: 197 TFLOP/s, 16 GiB, 819 GB/s; scaling book: ICI 4.5e10 B/s per "
         "link one way"),
    Chip("v6e", ("v6 lite", "v6e"), 918e12, 32 * GiB, 1.64e12, 2 * 1.8e11, 6.25e9,
         "Cloud TPU v6e page: 918 TFLOP/s, 32 GiB, 1,640 GB/s; scaling book: ICI 9e10 B/s per "
         "link one way"),
    Chip("h100", ("h100", "gh200"), 989e12, 80 * 10**9, 3.35e12, 4.5e11, 5e10,
         "NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 1,979 fp8 dense, 80 GB, 3.35 TB/s, "
         "NVLink 900 GB/s", 1979e12),
    Chip("h200", ("h200",), 989e12, 141 * 10**9, 4.8e12, 4.5e11, 5e10,
         "NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, 1,979 fp8 dense, 141 GB, 4.8 TB/s, "
         "NVLink 900 GB/s", 1979e12),
    Chip("a100", ("a100",), 312e12, 80 * 10**9, 2.039e12, 3e11, 2.5e10,
         "NVIDIA A100 SXM 80GB datasheet: 312 TFLOP/s bf16, 2,039 GB/s, NVLink 600 GB/s; "
         "200 Gb/s InfiniBand"),
)


def chip_named(name: str) -> Chip:
    for chip in CHIPS:
        if chip.name == name:
            return chip
    raise KeyError(name)


def chip_of_kind(device_kind: str) -> Chip | None:
    """The table's chip for a jax `device_kind` (longest matching name first: "v5 lite"
    before "v5")."""
    kind = device_kind.lower()
    matches = [(len(k), chip) for chip in CHIPS for k in chip.kinds if k in kind]
    return max(matches, key=lambda m: m[0])[1] if matches else None
