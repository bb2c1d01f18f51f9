"""The measuring scripts in scripts/ run (one round, one step, tiny shapes): what they print
is what the docs quote, so they must keep working."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=ONE_DEVICE)


@pytest.mark.parametrize("script,args,says", [
    ("bench_vs_hf", ["--config", "configs/missing.yaml"], "config file not found"),
    ("saved_residuals", ["configs/tiny.yaml", "model.bogus=1"], "unknown config key"),
    ("bench_data", ["--out", "{file}/out"], "{file}/out/corpus: Not a directory"),
    ("bench_restart", ["--out", "{file}/out"], "{file}/out: Not a directory"),
    ("gpu_checks", ["flash"], "attention 'flash': expected one of dot_product_attention, cudnn"),
])
def test_scripts_end_a_bad_input_in_one_line(tmp_path, script, args, says):
    """What the CLI says in one line (a bad config or override, a path that cannot be
    written) the scripts say the same way (`errors.script_main`), exit 1, no traceback."""
    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    done = run_script(f"scripts/{script}.py", *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"{script}: error: ")
    assert says.replace("{file}", str(tmp_path / "file")) in lines[0], lines


def test_gpu_checks_runs_its_checks_on_a_portable_kernel():
    """scripts/gpu_checks.py with JAX's portable attention in place of cuDNN: the comparison
    and causality checks pass, the packed-rows checks too (here through the xla blocks), and
    the exit status says so (gpu_bench.sh stops on 1)."""
    done = run_script("scripts/gpu_checks.py", "dot_product_attention")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GPU CHECKS PASS" in done.stdout and "causality" in done.stdout
    assert "PACKED ROWS CHECKS PASS" in done.stdout and "changing document 2" in done.stdout


def test_saved_residuals_traces_what_packed_rows_add():
    """scripts/saved_residuals.py with cuDNN attention (its checks stubbed, trace only): what
    packed rows add per layer is exactly cuDNN's larger stats, [B x M, heads, T] floats in
    place of [B, heads, T]."""
    b, m, heads, t = 8, 16, 4, 512
    done = run_script("scripts/saved_residuals.py", "configs/tiny.yaml", "--rows", str(b),
                      "model.attention=cudnn", "model.compute_dtype=bfloat16",
                      "model.remat=projections_and_attention", f"data.seq_len={t}")
    assert done.returncode == 0, done.stdout + done.stderr
    added = re.search(r"packed rows +[\d,.]+ MiB per layer \(\+([\d.]+)\)", done.stdout)
    assert added, done.stdout
    assert float(added[1]) == pytest.approx(b * (m - 1) * heads * t * 4 / 2**20, abs=0.006)
    refused = run_script("scripts/saved_residuals.py", "configs/tiny.yaml", "model.attention=cuda")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "saved_residuals: error: override 'model.attention=cuda': model.attention='cuda' is not "
        "one of: xla, dot_product_attention, cudnn"], refused.stderr


def test_gpu_checks_grouped_kv_report_says_where_it_cannot_run():
    """The report on grouped K/V (run in its own process on a GPU, since wrong offsets could
    fault there) refuses in one line where cuDNN's packed layout does not run."""
    done = run_script("scripts/gpu_checks.py", "--grouped-kv-report")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "cuDNN's packed layout does not run here (a Hopper or later GPU and cuDNN 9.6+ "
        "needed)"], done.stderr


def test_ab_bench_times_each_variant():
    done = run_script("scripts/ab_bench.py", "--config", "configs/tiny.yaml", "--rounds", "1",
                      "--steps", "1", "", "model.remat=full")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if "tokens/s (median of 1 steps)" in line]
    assert len(lines) == 2 and lines[1].endswith("model.remat=full"), done.stdout
    # The same parameters and batch in both workers: the first losses agree.
    first = [float(line.split()[-1]) for line in done.stdout.splitlines()
             if line.startswith("compiled ")]
    assert len(first) == 2 and abs(first[0] - first[1]) < 1e-5


def test_bench_vs_hf_measures_ours_and_transformers():
    done = run_script("scripts/bench_vs_hf.py", "--config", "configs/tiny.yaml", "--rounds",
                      "1", "--steps", "1", "--systems", "llama_jax,eager", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2, done.stdout
    assert all(row.get("tokens_per_sec", 0) > 0 for row in rows), rows


def test_the_transformers_peer_accumulates_when_its_batch_does_not_fit(tmp_path, monkeypatch,
                                                                       capsys):
    """Where transformers runs out of memory on the whole batch (here: forced above 2 rows a
    pass), the peer runs it in the fewest equal parts that fit with their gradients
    accumulated: the first step's gradient norm is the whole batch's, and it says so. A
    batch that fits in no part ends in the out-of-memory error."""
    import importlib.util

    import torch
    from helpers import ROOT, tiny
    from transformers import LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("bench_vs_hf", ROOT / "scripts/bench_vs_hf.py")
    bench_vs_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_vs_hf)
    cfg = tiny(tmp_path)  # 8 rows of 64 tokens
    norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: norms.append(float(clip(params, max_norm))))
    bench_vs_hf.transformers_llama(cfg, 1, False)
    whole = norms[0]
    forward = LlamaForCausalLM.forward

    def small_memory(self, input_ids=None, **kw):
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("forced: more than 2 rows")
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", small_memory)
    norms.clear()
    _, parts = bench_vs_hf.fitted_transformers_llama(cfg, 1, False)
    assert parts == 4 and abs(norms[0] - whole) < 1e-5 * whole, (norms, whole)
    said = capsys.readouterr().err
    assert "out of memory at 8 rows" in said and "trying 4 microbatches of 2" in said, said
    monkeypatch.setattr(LlamaForCausalLM, "forward",
                        lambda self, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        bench_vs_hf.fitted_transformers_llama(cfg, 1, False)


def test_bench_data_measures_every_figure(tmp_path):
    """The data benchmark end to end on a 2 MB corpus (the figures in docs/performance.md
    come from the same script at 4 GB)."""
    done = run_script("scripts/bench_data.py", "--gb", "0.002", "--out", str(tmp_path),
                      "--steps", "2", "--batches", "5", "--seq-len", "128", "--workers", "1")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["files"] == 1 and figures["documents"] > 50
    for key in ("cache_tokens_per_sec", "text_tokens_per_sec", "sentencepiece_mb_per_s_one_core",
                "tokenize_mb_per_s_per_worker", "prepare_peak_rss_gib", "train_peak_rss_gib"):
        assert figures[key] > 0, key
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.slow  # five train/bench processes; the cache itself: test_survival.py
def test_bench_restart_times_cold_and_warm_starts(tmp_path):
    done = run_script("scripts/bench_restart.py", "--config", "configs/tiny.yaml",
                      "--compile-config", "configs/tiny.yaml", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warm restart said: step " in done.stdout
    # whole (the step kept by this project) or from JAX's own cache: either is a warm start
    assert re.search(r"train step loaded (whole )?from the compilation cache", done.stdout)
    assert re.search(r"with a warm cache the first step began [\d.]+x sooner", done.stdout)
    assert re.search(r"compiled [\d.]+x sooner with a warm cache", done.stdout)


@pytest.mark.slow  # a plan that measures every candidate it compiles
def test_calibrate_plan_compares_prediction_with_measurement(tmp_path):
    done = run_script("scripts/calibrate_plan.py", "--config", "configs/tiny.yaml",
                      "--tokens-per-step", "1024", "--remat", "full", "--budget-minutes", "1",
                      "--steps", "2", "--repeats", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert result["candidates"] >= 2 and result["top_pick_over_best"] >= 1.0
    assert result["min_ratio"] <= result["median_predicted_over_measured"] <= result["max_ratio"]
    assert 1.0 <= result["top3_over_best"] <= result["top_pick_over_best"]
    assert -1.0 <= result["rank_correlation"] <= 1.0
    assert all(len(runs) == 2 for runs in result["runs_s"].values())
    assert result["run_spread_median"] >= 0 and "times: the slowest run" in done.stdout
    assert "from the best" in done.stdout and "rank correlation" in done.stdout
