"""Mesh sweeps: every layout compiled and measured in its own process, failures isolated,
outputs written, per-device memory as the shardings say, and TPU slices compiled from CPU."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS
from helpers import ctrl_c_after, run_cli

from llama_jax import flops
from llama_jax.config import load_config
from llama_jax.errors import ConfigError
from llama_jax.sweep import enumerate_layouts, factorizations, layout_label, parse_layouts
from llama_jax.topology import ENV_LIBTPU, libtpu_folder, libtpu_requirement, parse_topology

# Crashes (SIGSEGV, no Python traceback) any `bench` child whose command line holds the layout
# data=4 x tensor=2: the worst kind of failure, with nothing printed to explain it.
CRASH_ONE_LAYOUT = """
import os, signal
with open("/proc/self/cmdline", "rb") as f:
    argv = f.read().split(b"\\0")
if b"bench" in argv and b"mesh.data=4" in argv and b"mesh.tensor=2" in argv:
    os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_factorizations_cover_every_ordered_product():
    assert sorted(factorizations(8, 3)) == sorted(
        (a, b, 8 // (a * b)) for a in (1, 2, 4, 8) for b in (1, 2, 4, 8) if 8 % (a * b) == 0)
    assert len(enumerate_layouts(16, ("data", "fsdp", "tensor", "sequence"))) == 35
    assert layout_label(parse_layouts("data=2, fsdp=4")[0]) == "data=2,fsdp=4"
    assert [layout_label(x) for x in parse_layouts("fsdp=8;data=1,fsdp=8;data=8;fsdp=8")] == \
        ["fsdp=8", "data=8"]


def test_bad_layouts_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="cannot read 'pipeline=2'"):
        parse_layouts("data=2;pipeline=2")
    result = run_cli("sweep", "configs/tiny.yaml", "--layouts", "data=2;fsdp=x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "fsdp=x" in result.stderr
    for flag, value, why in [("--devices", "0", "must be >= 1, got 0"),  # was "all devices"
                             ("--timeout", "0", "must be > 0.0, got 0")]:  # failed every layout
        refused = run_cli("sweep", "configs/tiny.yaml", flag, value)
        assert refused.returncode == 2
        assert f"argument {flag}: {why}" in refused.stderr.strip().splitlines()[-1]


def test_a_sweep_interrupted_by_ctrl_c_keeps_what_it_measured(tmp_path):
    """Ctrl-C during the second layout: the first layout's figures are written (table,
    json, csv, png), the second and third are marked not run, and the exit status is 130.
    (Everything measured was lost.)"""
    out = tmp_path / "sweep"
    code, stdout, stderr = ctrl_c_after(
        "[2/3]", "sweep", "configs/tiny.yaml", "--layouts", "fsdp=8;data=8;data=2,fsdp=4",
        "--compile-only", "--out", str(out))
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (f"llama-jax sweep: interrupted after 1 "
                                               f"layout(s); they are in the table and {out}")
    rows = {r["layout"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["fsdp=8"]["status"] == "ok" and rows["fsdp=8"]["compiled_per_device_gib"]
    assert {rows[k]["status"] for k in ("data=8", "data=2,fsdp=4")} == {"not run"}
    assert (out / "sweep.png").is_file() and "fsdp=8" in stdout


def test_sweep_of_every_layout_isolates_a_crash(tmp_path):
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "sitecustomize.py").write_text(CRASH_ONE_LAYOUT)
    out = tmp_path / "sweep"
    env = {"PYTHONPATH": f"{crash}:{Path(__file__).resolve().parent.parent}"}
    result = run_cli("sweep", "configs/tiny.yaml", "--devices", "8", "--steps", "2",
                     "--out", str(out), env=env, timeout=1200)
    assert result.returncode == 0, result.stderr
    rows = {r["layout"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    # Every factorisation of 8 over data, fsdp, tensor is listed once.
    assert len(rows) == len(factorizations(8, 3)) == 10
    invalid = {k: r["reason"] for k, r in rows.items() if r["status"] == "invalid"}
    assert invalid == {
        "tensor=8": "mesh.tensor=8 does not divide model.num_heads=4",
        "fsdp=2,tensor=4": "mesh.tensor=4 does not divide model.num_kv_heads=2",
        "data=2,tensor=4": "mesh.tensor=4 does not divide model.num_kv_heads=2",
    }
    assert rows["data=4,tensor=2"]["status"] == "failed"
    assert rows["data=4,tensor=2"]["reason"] == "crashed (SIGSEGV)"
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert len(ok) == 6 and all(r["tokens_per_sec"] > 0 and r["compile_s"] > 0 for r in ok.values())
    assert sorted(r["rank"] for r in ok.values()) == list(range(1, 7))
    # Per-device argument bytes: the train state split over fsdp x tensor (plus the batch).
    cfg = load_config(CONFIGS / "tiny.yaml")
    state = flops.state_bytes(cfg)["total"]
    for label, row in ok.items():
        mesh = row["mesh"]
        expected = state / (mesh["fsdp"] * mesh["tensor"])
        assert row["argument_gib"] * 2**30 == pytest.approx(expected, rel=0.05), label
    with (out / "sweep.csv").open() as f:
        assert sorted(r["layout"] for r in csv.DictReader(f)) == sorted(rows)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "crashed (SIGSEGV)" in result.stdout and "tokens/s" in result.stdout


def test_explicit_layouts_compile_only_and_impossible_ones(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "configs/tiny.yaml", "--compile-only", "--out", str(out),
                     "--layouts", "data=2,fsdp=4;data=3;sequence=8",
                     "train.global_batch_size=4")
    assert result.returncode == 0, result.stderr
    rows = {r["layout"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["data=3"]["reason"] == "uses 3 devices, not 8"
    assert rows["data=2,fsdp=4"]["status"] == "invalid"
    assert "does not divide train.global_batch_size=4" in rows["data=2,fsdp=4"]["reason"]
    assert rows["sequence=8"]["status"] == "ok"
    assert rows["sequence=8"]["compiled_per_device_gib"] > 0
    assert rows["sequence=8"]["tokens_per_sec"] is None


def test_a_sweep_in_which_no_layout_ran_fails(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "configs/tiny.yaml", "--compile-only", "--out", str(out),
                     "--layouts", "data=3;data=2,fsdp=4", "train.global_batch_size=4")
    assert result.returncode == 1
    assert "no layout ran" in result.stderr.strip().splitlines()[-1]
    assert (out / "sweep.json").is_file()  # the table still says why


@pytest.mark.parametrize(("name", "generation", "shape", "slices", "chips"), [
    ("v5p:2x2x2", "v5p", (2, 2, 2), 1, 8),
    ("v5p-16", "v5p", (2, 2, 2), 1, 8),
    ("v4-32", "v4", (2, 2, 4), 1, 16),
    ("v5p-128", "v5p", (4, 4, 4), 1, 64),
    ("v5e-256", "v5e", (16, 16), 1, 256),
    ("v5litepod-16", "v5e", (4, 4), 1, 16),
    ("v6e-64", "v6e", (8, 8), 1, 64),
    ("2xv5p-128", "v5p", (4, 4, 4), 2, 128),
])
def test_tpu_slice_names(name, generation, shape, slices, chips):
    tpu = parse_topology(name)
    assert (tpu.generation, tpu.shape, tpu.num_slices, tpu.chips) == (generation, shape, slices,
                                                                      chips)


@pytest.mark.parametrize("name", ["v7x-8", "v5p-12", "v5p:2x2", "tpu", "v5p-3"])
def test_bad_tpu_slice_names(name):
    with pytest.raises(ConfigError):
        parse_topology(name)


@pytest.fixture(scope="module")
def libtpu_path(tmp_path_factory) -> Path:
    """The libtpu `make tpu` installed beside the environment, else one downloaded for the
    test (skipped only when neither is possible)."""
    if (libtpu_folder() / "libtpu").is_dir():
        return libtpu_folder()
    requirement = libtpu_requirement()
    target = tmp_path_factory.mktemp("libtpu")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(target), requirement],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"cannot install {requirement}: {done.stderr.strip().splitlines()[-1:]}")
    return target


# slow (make test-all): three TPU compiles through `sweep --topology`; `make test` keeps the
# same compile-only path through test_plan.py::test_plan_for_a_tpu_slice_gives_a_config_that_fits
# (plan compiles its layouts with sweep's code) and `bench --topology` there.
@pytest.mark.slow
def test_tpu_topology_compile_only_sweep(tmp_path, libtpu_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "configs/tiny.yaml", "--topology", "v5p:2x2x2", "--out", str(out),
                     "--layouts", "fsdp=8;data=2,fsdp=4;fsdp=4,tensor=2",
                     env={ENV_LIBTPU: str(libtpu_path)}, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["topology"] == "v5p:2x2x2" and summary["compile_only"]
    for row in summary["rows"]:
        assert row["status"] == "ok", row
        assert row["device_memory_gib"] == pytest.approx(95.74) and row["fits"] is True
        assert 0 < row["compiled_per_device_gib"] < 1
        assert row["xla_flops_per_device"] > 0


def test_an_out_that_cannot_be_written_is_refused_before_any_layout_runs(tmp_path):
    """Read-only (a bind mount here; root writes through plain permissions) and nothing
    written there or created."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        result = run_cli("sweep", "configs/tiny.yaml", "--layouts", "fsdp=8;data=8",
                         "--steps", "1", "--out", str(ro / "sweep"), timeout=120)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"llama-jax sweep: error: --out {ro / 'sweep'}: {ro} is on a read-only file system"]
    assert list(ro.iterdir()) == []


def test_topology_without_libtpu_is_one_line(tmp_path):
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed in this environment")
    result = run_cli("bench", "configs/tiny.yaml", "--topology", "v5p:2x2x2",
                     env={ENV_LIBTPU: str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "llama-jax bench: error: --topology needs libtpu, which the default install leaves "
        "out: run `make tpu` (or pip install -e '.[tpu]')")


# slow (make test-all): two TPU compiles of 16k-token layouts; test_plan.py's TPU slice test
# keeps the compile-only path in `make test`.
@pytest.mark.slow
def test_long_context_layouts_compile_for_a_tpu_slice(tmp_path, libtpu_path):
    """Context parallelism (both kinds) and the chunked loss compile for a TPU slice from
    this CPU machine; a layout that does not fit is reported by libtpu's own figures, and
    `bench --topology` says so in one line."""
    out = tmp_path / "sweep"
    long = ["data.seq_len=16384", "model.max_position_embeddings=16384", "model.loss_chunks=4"]
    result = run_cli("sweep", "configs/tiny.yaml", "--topology", "v5p:2x2x2", "--out", str(out),
                     "--layouts", "fsdp=8;fsdp=2,sequence=4", *long,
                     env={ENV_LIBTPU: str(libtpu_path)}, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = {r["layout"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert all(r["status"] == "ok" and r["fits"] for r in rows.values()), rows
    ring = run_cli("bench", "configs/tiny.yaml", "--topology", "v5p:2x2x2", *long,
                   "mesh.fsdp=2", "mesh.sequence=4", "model.context_parallel=ring",
                   env={ENV_LIBTPU: str(libtpu_path)}, timeout=900)
    assert ring.returncode == 0, ring.stderr
    assert json.loads(ring.stdout.strip().splitlines()[-1])["fits"] is True
    offload = run_cli("bench", "configs/tiny.yaml", "--topology", "v5p:2x2x2",
                      "model.remat=offload_dots_with_no_batch_dims",
                      env={ENV_LIBTPU: str(libtpu_path)}, timeout=900)
    assert offload.returncode == 0, offload.stderr
    huge = run_cli("bench", "configs/tiny.yaml", "--topology", "v5p:2x2x2",
                   "train.global_batch_size=1048576",
                   env={ENV_LIBTPU: str(libtpu_path)}, timeout=900)
    assert huge.returncode != 0
    [line] = huge.stderr.strip().splitlines()  # libtpu's start-up warnings are quiet too
    assert line.startswith("llama-jax bench: error: does not fit on v5p:2x2x2: "
                           "RESOURCE_EXHAUSTED"), line
    slices = run_cli("bench", "configs/tiny.yaml", "--topology", "2xv5p-16",
                     "train.global_batch_size=16", env={ENV_LIBTPU: str(libtpu_path)})
    assert slices.stderr.strip() == (
        "llama-jax bench: error: the devices come from 2 TPU slices joined by the data-center "
        "network: say which mesh axis spans them, e.g. mesh.dcn_data=2")


def test_a_sweep_stopped_by_sigterm_leaves_no_measurement_running(tmp_path):
    """A scheduler's SIGTERM to the sweep alone: the layout's `bench` it had started ends with
    it (Linux's parent-death signal), instead of running on and holding the devices."""
    import signal
    import time

    import psutil
    from conftest import ROOT

    sweep = subprocess.Popen(
        [sys.executable, "-m", "llama_jax.cli", "sweep", "configs/tiny.yaml", "--layouts",
         "fsdp=8", "--steps", "1000000", "--out", str(tmp_path)], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not children:
            children = psutil.Process(sweep.pid).children()
            time.sleep(0.2)
        assert children, "the sweep started no bench"
        sweep.send_signal(signal.SIGTERM)
        sweep.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive
    finally:
        for p in [sweep, *children]:
            with contextlib.suppress(Exception):
                p.kill()
