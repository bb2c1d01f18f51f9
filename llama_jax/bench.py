"""Throughput of the real train step (and of the input pipeline), measured honestly.

The step is compiled ahead of time (so compile time is its own figure), warmed up, then timed
one step at a time with the result awaited; the median is reported. MFU divides model FLOPs
(the `info` formula) by the platform peak: a datasheet dense-bf16 figure per accelerator chip,
or on CPU a float32 matmul measured in this same process.
"""

from __future__ import annotations

import collections
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax import flops, hlo_cost, kernel_profile, roofline
from llama_jax.config import Config, apply_overrides
from llama_jax.data.batch import one_document_rows, to_global
from llama_jax.data.feed import make_source, prepare
from llama_jax.errors import LlamaJaxError, check_can_write, first_line
from llama_jax.gpu_target import GpuNodes
from llama_jax.sharding import make_mesh
from llama_jax.step import Setup, init_state, make_fp8_calibration, make_setup, make_train_step
from llama_jax.storage import is_remote
from llama_jax.topology import Target, parse_topology, topology_devices


def random_batch(cfg: Config) -> dict[str, np.ndarray]:
    """Random tokens, one sequence a row; with `data.synthetic_document_tokens`, the packed
    rows of synthetic documents (what packed rows cost is the point then)."""
    if cfg.data.synthetic_document_tokens:
        return next(make_source(cfg, None, "train", cfg.train.global_batch_size,
                                cfg.train.seed))
    rows = cfg.train.global_batch_size // jax.process_count()
    rng = np.random.default_rng(cfg.train.seed + jax.process_index())
    tokens = rng.integers(0, cfg.model.vocab_size, (rows, cfg.data.seq_len + 1), np.int32)
    return one_document_rows(tokens)


def _memory_stats(device: jax.Device) -> dict[str, Any]:
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - compile-only and some CPU devices do not implement it
        return {}


def _device_memory_limit(device: jax.Device, tpu: Target | None) -> int | None:
    """Bytes one device may hold, where known: the runtime's limit, or the chip's datasheet
    HBM for a compile-only device (which has no runtime). None on CPU."""
    if tpu is not None:
        return tpu.hbm_bytes
    return _memory_stats(device).get("bytes_limit") if device.platform != "cpu" else None


def compiled_figures(devices: list[jax.Device], compiled: Any,
                     tpu: Target | None = None, cfg: Config | None = None) -> dict[str, Any]:
    """Per-device memory XLA planned for the step (arguments, outputs, temporaries; aliased
    donated buffers counted once), XLA's own FLOP count for one device's program, and what the
    device actually peaked at when it ran."""
    out: dict[str, Any] = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        parts = {"argument": analysis.argument_size_in_bytes,
                 "output": analysis.output_size_in_bytes,
                 "temp": analysis.temp_size_in_bytes,
                 "alias": analysis.alias_size_in_bytes}
        out.update({f"{k}_gib": v / 2**30 for k, v in parts.items()})
        total = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
        out["compiled_per_device_gib"] = total / 2**30
    limit = _device_memory_limit(devices[0], tpu)
    if limit:
        out["device_memory_gib"] = limit / 2**30
        if "compiled_per_device_gib" in out:
            out["fits"] = out["compiled_per_device_gib"] <= out["device_memory_gib"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and "flops" in cost:
        out["xla_flops_per_device"] = float(cost["flops"])
    stats = _memory_stats(devices[0])
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    text = compiled.as_text() or ""
    out.update(predicted_figures(
        devices, text, model_flops_per_device(cfg, len(devices)) if cfg else 0.0))
    out["custom_calls"] = dict(collections.Counter(
        re.findall(r'custom_call_target="([^"]+)"', text)))
    out["fp8_matmuls"] = hlo_cost.fp8_matmuls(text)
    out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# Matmul work of a step relative to the model's FLOPs, by remat policy: full remat runs the
# forward twice; the policies that keep the matmul outputs recompute only element-wise work.
RECOMPUTE = {"full": 4 / 3}


def model_flops_per_device(cfg: Config, devices: int) -> float:
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return (flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens
            * RECOMPUTE.get(cfg.model.remat, 1.0) / devices)


def predicted_figures(devices: list[jax.Device], hlo_text: str,
                      model_flops: float = 0.0) -> dict[str, Any]:
    """One device's matmul FLOPs, memory traffic and collective bytes read from the compiled
    program (loops counted as often as they run), its kernels binned by size, and, on an
    accelerator in the chip table, the roofline step time they predict. CPU devices get none:
    their rates are measured (roofline.py), which takes seconds and, beside other compiles,
    reads noise; `plan` measures them once and predicts from these figures."""
    if not hlo_text:
        return {}
    cost = hlo_cost.program_cost(hlo_text, len(devices), [_network_unit(d) for d in devices],
                                 on_chip_space=1 if devices[0].platform == "tpu" else None)
    out: dict[str, Any] = {"hlo_flops_per_device": cost.flops,
                           "hlo_fp8_flops_per_device": cost.fp8_flops,
                           "model_flops_per_device": model_flops,
                           "hlo_bytes_per_device": cost.bytes,
                           "ici_bytes_per_device": cost.ici_bytes,
                           "dcn_bytes_per_device": cost.dcn_bytes,
                           "collective_bytes": cost.collectives,
                           "collective_ops": cost.collective_ops,
                           "hlo_kernels": cost.kernels}
    limits = roofline.chip_roofline(devices[0].device_kind) \
        if devices[0].platform != "cpu" else None
    if limits is not None:
        out["predicted_step_s"] = limits.step_seconds(out)
    return out


def _network_unit(device: jax.Device) -> int:
    """What the data-center network joins: TPU slices, GPU nodes (a process each)."""
    return device.process_index if device.platform == "gpu" else (
        getattr(device, "slice_index", 0) or 0)


def compiled_random_step(setup: Setup) -> tuple[Any, dict[str, jax.Array], Any, float]:
    """A fresh train state, one random global batch, the train step compiled ahead of time
    for them, and the compile seconds: what every throughput measurement starts from."""
    cfg = setup.cfg
    state = init_state(setup)
    batch = to_global(random_batch(cfg), setup.mesh, setup.rules, cfg.train.global_batch_size)
    calibrate = make_fp8_calibration(setup)  # delayed fp8: amax histories begun, as train does
    if calibrate is not None:
        state = calibrate(state, batch)
    start = time.perf_counter()
    compiled = make_train_step(setup).lower(state, batch).compile()
    return state, batch, compiled, time.perf_counter() - start


def bench_step(cfg: Config, steps: int = 10, warmup: int = 2, profile: str = "",
               profile_steps: int = 2) -> dict[str, Any]:
    """Timed steps of the compiled train step; with `profile` (a local folder), then
    `profile_steps` more under the JAX profiler, whose kernels are summarised into the result
    and `profile/kernels.txt` (kernel_profile.py). Traced steps are not timed: tracing slows
    them down."""
    if profile and is_remote(profile):
        raise LlamaJaxError(f"bench --profile {profile}: a local folder (the profiler writes "
                            f"local files; copy them up afterwards)")
    if profile:
        check_can_write(Path(profile), f"bench --profile {profile}")
    setup = make_setup(cfg)
    devices = list(setup.mesh.devices.flat)
    peak, peak_source = flops.platform_peak_flops(devices)  # measured before the model runs
    state, batch, compiled, compile_s = compiled_random_step(setup)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    kernels = traced_kernels(compiled, state, batch, profile, profile_steps) if profile else {}
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    tps = tokens / step_time
    fpt = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    return {
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "compile_s": compile_s,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "tokens_per_sec": tps,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": flops.mfu(tps, fpt, peak),
        "loss": float(metrics["loss"]),
        **compiled_figures(devices, compiled, cfg=cfg),
        **kernels,
    }


def traced_kernels(compiled: Any, state: Any, batch: dict[str, jax.Array], folder: str,
                   steps: int) -> dict[str, Any]:
    """`steps` more steps under the JAX profiler into `folder`, and where their kernel time
    went (also written to `folder/kernels.txt`). A trace that cannot be read is reported as
    `profile_error` beside the timings already measured, not in their place."""
    try:
        # Both trace formats: which of them a JAX version writes by default has changed.
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
    except Exception as e:  # noqa: BLE001 - no profiler here (CUPTI missing, one already on)
        return {"profile_error": f"the profiler did not start: {first_line(e)}"}
    try:
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
    finally:
        jax.profiler.stop_trace()
    try:
        summary = kernel_profile.summarize(folder, steps=steps)
        (Path(folder) / "kernels.txt").write_text(summary.text())
    except (LlamaJaxError, OSError) as e:
        return {"profile_error": first_line(e)}
    return summary.figures()



def compile_only(cfg: Config, topology: str | None = None) -> dict[str, Any]:
    """Ahead-of-time compile of the real train step from abstract inputs: no parameter or
    batch is ever allocated, so a 7B step compiles on a laptop. With `topology` (a TPU slice
    name, or GPUs: `h100:8`) it compiles for those devices, which need not exist here."""
    tpu = parse_topology(topology) if topology else None
    mesh = make_mesh(cfg, topology_devices(tpu)) if tpu else None
    setup = make_setup(cfg, mesh)
    rows, length = cfg.train.global_batch_size, cfg.data.seq_len
    batch_sharding = setup.batch_shardings()
    batch = {k: jax.ShapeDtypeStruct((rows, length), np.float32 if k == "weights" else np.int32,
                                     sharding=s) for k, s in batch_sharding.items()}
    step = make_train_step(setup)
    start = time.perf_counter()
    try:
        lowered = step.lower(setup.abstract_state, batch)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - jaxlib's runtime error type moved between versions
        first = first_line(e)
        where = f"{tpu}" if tpu else f"{len(setup.mesh.devices.flat)} devices"
        if "RESOURCE_EXHAUSTED" in first:
            raise LlamaJaxError(f"does not fit on {where}: {first}") from None
        if isinstance(tpu, GpuNodes):  # what the GPU's libraries refuse (cuDNN: dtype, head dim)
            raise LlamaJaxError(f"cannot compile the step for {where}: {first}") from None
        raise
    compile_s = time.perf_counter() - start
    devices = list(setup.mesh.devices.flat)
    out = {"device": f"{len(devices)} x {devices[0].device_kind}"
                     + (f" ({tpu}, compile only)" if tpu else ""),
           "lower_s": lower_s, "compile_s": compile_s,
           "flops_per_token": flops.flops_per_token(cfg.model, cfg.data.seq_len)}
    out.update(compiled_figures(devices, compiled, tpu, cfg))
    out.pop("host_peak_rss_gib", None)
    return out


def bench_pipeline(cfg: Config, batches: int = 50) -> dict[str, Any] | None:
    """Tokens per second this process's input pipeline delivers, as the run would read
    (`pipeline_tokens_per_sec`), and apart: from text tokenized on the fly and from the
    token cache (None when `prepare-data` has not written it). None for synthetic data."""
    data = prepare(cfg)
    if data is None:
        return None
    out: dict[str, Any] = {"pipeline_batches": batches,
                           "pipeline_reads": ",".join(sorted({s.reads for s in data.sources})),
                           "pipeline_tokens_per_sec": _pipeline_speed(cfg, data, batches)}
    if any(s.files for s in data.sources):  # local text: both ways
        text_cfg = apply_overrides(cfg, ["data.token_cache=false"])
        on_text = _pipeline_speed(text_cfg, prepare(text_cfg), batches)
        cached = all(s.reads == "tokens" for s in data.sources)
        out["pipeline_text_tokens_per_sec"] = on_text
        out["pipeline_cache_tokens_per_sec"] = out["pipeline_tokens_per_sec"] if cached else None
    return out


def _pipeline_speed(cfg: Config, data: Any, batches: int) -> float:
    rows = cfg.train.global_batch_size
    source = make_source(cfg, data, "train", rows, cfg.train.seed)
    next(source)  # start-up (threads, first reads) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    seconds = time.perf_counter() - start
    getattr(source, "close", lambda: None)()
    return batches * rows * cfg.data.seq_len / seconds
