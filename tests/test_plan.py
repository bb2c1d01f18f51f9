"""`llama-jax plan` and what it stands on: the compiled program's cost (hlo_cost.py), the
arithmetic that prunes, the chip table; plans on simulated CPU devices and for a TPU slice."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import CONFIGS
from helpers import run_cli
from test_sweep import libtpu_path  # noqa: F401 - a fixture

from llama_jax import flops, hlo_cost
from llama_jax.bench import compiled_random_step
from llama_jax.chips import chip_of_kind
from llama_jax.config import load_config
from llama_jax.plan import Candidate, candidates, estimated_bytes
from llama_jax.step import make_setup
from llama_jax.topology import ENV_LIBTPU, parse_topology


def _compiled(*overrides):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.global_batch_size=16", "mesh.fsdp=4",
                                              "mesh.tensor=2", *overrides])
    _, _, compiled, _ = compiled_random_step(make_setup(cfg))
    return cfg, compiled


def test_program_cost_counts_loops_as_often_as_they_run():
    """The layers as a scan (a while loop) and unrolled are the same work: XLA's own count
    sees one trip of the loop, ours all of them, within 3% of each other and of the model's
    FLOPs (which count causal attention as half; XLA computes whole blocks)."""
    cfg, scanned = _compiled("model.scan_layers=true")
    _, unrolled = _compiled("model.scan_layers=false")
    loop = hlo_cost.program_cost(scanned.as_text(), 8)
    flat = hlo_cost.program_cost(unrolled.as_text(), 8)
    model = flops.flops_per_token(cfg.model, cfg.data.seq_len) * 16 * cfg.data.seq_len / 8
    assert loop.flops == pytest.approx(flat.flops, rel=0.03)
    assert model <= loop.flops <= 1.15 * model
    xla = scanned.cost_analysis()
    xla = xla[0] if isinstance(xla, list | tuple) else xla
    assert xla["flops"] < 0.6 * loop.flops  # why the module exists
    assert loop.ici_bytes == pytest.approx(flat.ici_bytes, rel=0.05) and loop.ici_bytes > 0
    assert set(loop.collectives) == set(flat.collectives)
    assert loop.dcn_bytes == 0


@pytest.mark.parametrize(("attributes", "groups"), [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, x",
     [[0, 2], [1, 3]]),
    ("channel_id=3, use_global_device_ids=true", [[0, 1, 2, 3]]),
])
def test_replica_group_notations(attributes, groups):
    assert sorted(map(sorted, hlo_cost.replica_groups(attributes, 4))) == groups


def test_collective_bytes_and_slices():
    text = """HloModule m

ENTRY %main (p: f32[8,4]) -> f32[32,8] {
  %p = f32[8,4]{1,0} parameter(0)
  %ag = f32[32,4]{1,0} all-gather(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar = f32[8,4]{1,0} all-reduce(%p), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  ROOT %d = f32[32,8]{1,0} dot(%ag, %ar), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""
    cost = hlo_cost.program_cost(text, 8, slice_of=[0, 0, 0, 0, 1, 1, 1, 1])
    assert cost.collectives["all-gather"] == pytest.approx(0.75 * 32 * 4 * 4)
    assert cost.collectives["all-reduce"] == pytest.approx(2 * 0.5 * 8 * 4 * 4)
    assert cost.ici_bytes == cost.collectives["all-gather"]  # within a slice
    assert cost.dcn_bytes == cost.collectives["all-reduce"]  # across the two slices
    assert cost.flops == 2 * 32 * 8 * 4


def test_chip_table_matches_device_kinds():
    assert chip_of_kind("TPU v5 lite").name == "v5e"
    assert chip_of_kind("TPU v5").name == "v5p"
    assert chip_of_kind("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert chip_of_kind("cpu") is None
    assert parse_topology("v5p:2x2x2").hbm_bytes == pytest.approx(95.74 * 2**30)


def test_arithmetic_prunes_what_cannot_fit_an_8b_model():
    """Llama 3 8B, seq 8192, 16 rows on a v5p:2x2x2 (95.7 GiB per chip): without remat two
    rows' activations per chip are well over; full remat over fsdp=8 is well inside."""
    cfg = load_config(CONFIGS / "llama3-8b.yaml", ["model.compute_dtype=bfloat16"])
    state = flops.state_bytes(cfg)["total"]
    hbm = parse_topology("v5p:2x2x2").hbm_bytes
    found = candidates(cfg, 8, 8 * 8192, [8192], ["none", "full"])
    assert {c.remat for c in found} == {"none", "full"} and {c.loss_chunks for c in found} == {0, 1}
    assert any(c.layout["sequence"] > 1 for c in found)  # long context: the sequence axis

    def one(remat, **layout):
        full = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **layout}
        return Candidate(8192, full, 16, 1, remat, 0)

    assert estimated_bytes(cfg, one("none", fsdp=8), state) > hbm
    assert estimated_bytes(cfg, one("full", fsdp=8), state) < 0.5 * hbm
    assert estimated_bytes(cfg, one("full", data=8), state) > hbm  # unsharded state: 8B x 16 B


def test_plan_on_simulated_cpu_devices(tmp_path):
    """Prune, compile (two at a time), predict, measure the best two, write the four files;
    the best as plan.yaml trains as it is."""
    out = tmp_path / "plan"
    done = run_cli("plan", "configs/tiny.yaml", "--devices", "8", "--remat", "full",
                   "--tokens-per-step", "1024", "--budget-minutes", "0.5", "--measure", "2",
                   "--steps", "2", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "plan.json").read_text())
    rows = result["rows"]
    ranked = [r for r in rows if r["rank"]]
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) >= 2
    assert ranked[0]["measured_step_s"] and ranked[1]["measured_step_s"]  # measured first
    assert ranked[0]["measured_step_s"] <= ranked[1]["measured_step_s"]
    assert all(r["predicted_step_s"] > 0 and r["compiled_gib"] > 0 for r in ranked)
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(r["reason"] for r in pruned)  # tensor=8 cannot split 2 KV heads
    assert all(r["status"] in ("ok", "pruned", "skipped") for r in rows)
    with (out / "plan.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "plan.png").stat().st_size > 10_000
    best = load_config(out / "plan.yaml")
    assert f"train.microbatches={best.train.microbatches}" in ranked[0]["overrides"]
    assert best.train.global_batch_size * best.data.seq_len == 1024
    trained = run_cli("train", str(out / "plan.yaml"), f"run_dir={tmp_path / 'run'}",
                      "train.steps=2", "train.eval_every=0", timeout=600)
    assert trained.returncode == 0, trained.stderr


def test_plan_refusals_are_one_line(tmp_path):
    missing = run_cli("plan", "configs/tiny.yaml")
    assert missing.returncode == 2 and "--topology" in missing.stderr
    odd = run_cli("plan", "configs/tiny.yaml", "--devices", "8", "--tokens-per-step", "1000",
                  "--out", str(tmp_path / "p"))
    assert odd.returncode == 2
    assert odd.stderr.strip().splitlines() == [
        "llama-jax plan: error: --tokens-per-step 1000 is not a multiple of the sequence "
        "length 64"]
    assert not (tmp_path / "p").exists()


def test_plan_for_a_tpu_slice_gives_a_config_that_fits(tmp_path, libtpu_path):  # noqa: F811
    out = tmp_path / "plan"
    env = {ENV_LIBTPU: str(libtpu_path)}
    done = run_cli("plan", "configs/tiny.yaml", "--topology", "v5p:2x2x2", "--remat", "full",
                   "--budget-minutes", "0.5", "--out", str(out), env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "plan.json").read_text())
    assert result["roofline"]["peak_flops"] == 459e12 and not result["measured"]
    best = result["rows"][0]
    assert best["rank"] == 1 and best["device_memory_gib"] == pytest.approx(95.74)
    bench = run_cli("bench", str(out / "plan.yaml"), "--topology", "v5p:2x2x2", env=env,
                    timeout=900)
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    assert figures["fits"] is True
    assert figures["predicted_step_s"] == pytest.approx(best["predicted_step_s"], rel=1e-6)
