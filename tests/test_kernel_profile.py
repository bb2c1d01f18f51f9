"""`llama-jax kernels` and `bench --profile`: where a step's device time went, from a profiler
trace. Checked against a hand-made GPU trace whose figures are known, against the summary
written by hand from the 2026-11-28 H200 profile (../shared/perf), and on real CPU traces of
`bench` and `train`."""

import gzip
import json
import os
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

from llama_jax import kernel_profile
from llama_jax.errors import LlamaJaxError

H200 = ROOT.parent / "shared" / "perf" / "h200-2026-11-28"


def _gpu_trace(path: Path) -> Path:
    """Two executions of `jit_step` and one of `jit_eval` on GPU 0, the same step's kernels on
    GPU 1 (not counted: one device's streams are the step), host events around them."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name",
         "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
         "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    step = [  # name, duration in microseconds
        ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 3000.0),
        ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 1000.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 1500.0),
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)", 100.0),
        ("gemm_fusion_dot_general_32", 400.0),
        ("loop_add_multiply_fusion", 250.0),
        ("input_reduce_fusion_14", 150.0),
        ("memcpy32_post", 80.0),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 20.0),
    ]
    events: list[dict] = list(meta)
    t = 0.0
    for pid in (1, 2):
        for _run in range(2):
            events.append({"ph": "X", "pid": 9, "tid": 1, "ts": t, "dur": 1.0,
                           "name": f"{'[1] ' if pid == 2 else ''}CommonPjRtLoadedExecutable"
                                   f"::Execute (jit_step)"})
            for name, dur in step:
                events.append({"ph": "X", "pid": pid, "tid": 7, "ts": t, "dur": dur,
                               "name": name, "args": {"hlo_module": "jit_step",
                                                      "hlo_op": "fusion.1"}})
                t += dur + 10.0  # 10 us between kernels
        events.append({"ph": "X", "pid": pid, "tid": 7, "ts": t, "dur": 500.0,
                       "name": "nvjet_eval", "args": {"hlo_module": "jit_eval",
                                                      "hlo_op": "dot.1"}})
        t += 1e4
    events.append({"ph": "X", "pid": 9, "tid": 1, "ts": 0.0, "dur": 5.0, "name": "python"})
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    return path


def test_summary_of_a_gpu_trace_by_kind_module_and_device(tmp_path):
    s = kernel_profile.summarize(_gpu_trace(tmp_path / "host.trace.json.gz"))
    assert (s.module, s.steps, s.kernels) == ("jit_step", 2, 9)  # counted from Execute events
    assert s.kernel_ms == pytest.approx(6.5)
    assert s.by_kind == pytest.approx({"matmul": 4.4, "attention": 1.6, "element-wise": 0.4,
                                       "copy": 0.08, "collective": 0.02})
    # Two executions of nine kernels, 10 us apart, and the gap between the executions.
    assert s.span_ms == pytest.approx((2 * 6500 + 17 * 10) / 1e3 / 2)
    assert s.top[0] == ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 4.0, 2.0)
    other = kernel_profile.summarize(tmp_path, module="jit_eval")  # a folder: the trace in it
    assert (other.steps, other.kernel_ms, other.by_kind) == (1, 0.5, {"matmul": 0.5})
    assert kernel_profile.summarize(tmp_path, steps=4).kernel_ms == pytest.approx(3.25)
    with pytest.raises(LlamaJaxError, match="module 'jit_train' ran no kernel here "
                                            r"\(modules: jit_eval, jit_step\)"):
        kernel_profile.summarize(tmp_path, module="jit_train")


@pytest.mark.skipif(not (H200 / "trace.json.gz").exists(), reason="no ../shared/perf profile")
def test_summary_of_the_h200_profile_matches_its_hand_made_summary():
    """kernels.txt beside the 2026-11-28 trace was written from it by another script; the
    per-kind figures and the busy time agree (its 'other' 0.6 ms are XLA fusions here)."""
    text = (H200 / "kernels.txt").read_text()
    s = kernel_profile.summarize(H200 / "trace.json.gz")
    assert (s.module, s.steps, s.kernels) == ("jit_step", 3, 1736)
    assert f"GPU busy per step: {s.kernel_ms:.1f} ms" in text
    for kind, figure in (("matmul", "333.2"), ("attention", "69.5"), ("copy", "18.0")):
        assert f"{s.by_kind[kind]:.1f}" == figure, kind
    assert s.by_kind["element-wise"] == pytest.approx(89.3 + 0.6, abs=0.1)
    assert s.top[0][0] == "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN"


def test_bench_profile_then_kernels_on_its_trace(tmp_path):
    """`bench --profile DIR` adds the traced steps' kernel figures to its JSON and writes
    DIR/kernels.txt; `kernels DIR` reads the same trace and counts the steps itself."""
    done = run_cli("bench", "configs/tiny.yaml", "--steps", "1", "--profile",
                   str(tmp_path), "--profile-steps", "3", "--json")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["profile_steps"] == 3 and row["profile_module"].startswith("jit_")
    assert sum(row["kernel_ms_by_kind"].values()) == pytest.approx(row["kernel_ms_per_step"])
    assert row["kernel_ms_by_kind"]["matmul"] > 0  # XLA:CPU's dot thunks were recognised
    # XLA:CPU runs independent thunks of one device at once, so their summed time may pass
    # the span (measured 114.3 ms in a 113.2 ms span on a busy machine), but not by more
    # than the host's threads allow
    assert 0 < row["kernel_ms_per_step"] <= row["kernel_span_ms_per_step"] * os.cpu_count()
    assert (tmp_path / "kernels.txt").read_text().startswith("kernels of ")
    again = run_cli("kernels", str(tmp_path), "--json")
    assert again.returncode == 0, again.stderr
    counted = json.loads(again.stdout)
    assert counted["profile_steps"] == 3  # one run id per execution
    assert counted["kernel_ms_per_step"] == pytest.approx(row["kernel_ms_per_step"])


def test_kernels_of_a_training_profile(tmp_path):
    """A run's `train.profile_steps` trace, on 8 simulated devices: one device's thunks, and
    the train step found as the module with the most kernel time."""
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=5",
                   "train.profile_start=2", "train.profile_steps=2", "train.eval_every=0")
    assert done.returncode == 0, done.stderr
    shown = run_cli("kernels", str(tmp_path / "profile"), "--top", "5")
    assert shown.returncode == 0, shown.stderr
    head = shown.stdout.splitlines()[1]
    assert head.startswith("module jit_") and " 2 step(s)" in head, shown.stdout
    assert "matmul" in shown.stdout and "Top kernels" in shown.stdout


def test_kernels_and_bench_profile_refuse_in_one_line(tmp_path):
    good = _gpu_trace(tmp_path / "good.trace.json.gz")
    torn = tmp_path / "torn" / "host.trace.json.gz"
    torn.parent.mkdir()
    torn.write_bytes(good.read_bytes()[:300])
    (tmp_path / "empty").mkdir()
    cases = [
        (("kernels", str(torn)), f"{torn}: not a readable trace (EOFError"),
        (("kernels", str(tmp_path / "empty")), "no *.trace.json.gz under it"),
        (("kernels", str(tmp_path / "absent")), "no such trace file or folder"),
        (("kernels", str(good), "--module", "jit_x"), "module 'jit_x' ran no kernel here"),
        (("bench", "configs/tiny.yaml", "--profile", "gs://bucket/prof"),
         "bench --profile gs://bucket/prof: a local folder"),
        (("bench", "configs/tiny.yaml", "--compile-only", "--profile", str(tmp_path / "p")),
         "does not go with --compile-only or --topology"),
        (("bench", "configs/tiny.yaml", "--profile", str(good / "p")),  # before the steps
         f"bench --profile {good / 'p'}: {good} is not a directory"),
    ]
    for args, message in cases:
        done = run_cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.stderr)
        assert message in lines[0], (args, lines[0])
    assert not (tmp_path / "p").exists()


def test_a_profiler_that_does_not_start_leaves_the_timings(tmp_path):
    """`bench --profile` where no trace can be taken (here: one is already running) reports
    why beside the timings it measured, instead of losing them in a traceback."""
    import jax
    import jax.numpy as jnp

    from llama_jax.bench import traced_kernels

    step = jax.jit(lambda state, batch: (state, {"loss": batch["x"].sum()}))
    jax.profiler.start_trace(str(tmp_path / "first"))
    try:
        out = traced_kernels(step, 0, {"x": jnp.ones(3)}, str(tmp_path / "second"), 1)
    finally:
        jax.profiler.stop_trace()
    assert list(out) == ["profile_error"]
    assert out["profile_error"].startswith("the profiler did not start: ")
