"""The cluster recipes in scripts/, run for real: SLURM under a stand-in `srun`, a TPU pod
under a stand-in `gcloud`, each starting two local processes that JAX joins."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

FAKES = ROOT / "tests" / "fakes"


@pytest.fixture
def shell_env(tmp_path):
    """PATH with `python3` as this interpreter (the scripts call python3) and the fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    for fake in ("srun", "gcloud"):
        (bin_dir / fake).symlink_to(FAKES / fake)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _processes_that_saved(run_dir: Path, step: int) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / str(step) / "state").iterdir()
                  if p.name.startswith("ocdbt.process_"))


def test_slurm_recipe_trains_across_two_tasks(tmp_path, shell_env):
    run_dir = tmp_path / "run"
    env = {**shell_env, "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_gpu.sbatch"), "train",
                           "configs/tiny.yaml",
                           "mesh.fsdp=-1", "train.steps=3", f"run_dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _processes_that_saved(run_dir, 3) == ["ocdbt.process_0", "ocdbt.process_1"]


def test_tpu_pod_recipe_ships_the_repo_and_trains_on_two_workers(tmp_path, shell_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake_root = tmp_path / "tpu"
    fake_root.mkdir()
    run_dir = tmp_path / "run"
    env = {**shell_env, "FAKE_TPU_ROOT": str(fake_root), "FAKE_TPU_WORKERS": "2",
           "FAKE_TPU_PORT": str(port), "LLAMA_JAX_INSTALL": "true"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "tpu_pod.sh"), "my-tpu",
                           "us-central2-b", "my-project", str(run_dir), "--", "train",
                           "configs/tiny.yaml", "mesh.fsdp=-1", "train.steps=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = (fake_root / "calls.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh"]
    assert all("--worker=all" in c and "--zone us-central2-b" in c for c in calls)
    for worker in ("worker-0", "worker-1"):
        shipped = fake_root / worker / "llama_jax"
        assert (shipped / "llama_jax" / "cli.py").is_file()
        assert (shipped / "configs" / "tiny.yaml").is_file()
        for never in (".venv", "runs", "data_cache", ".git"):
            assert not (shipped / never).exists(), never
    assert _processes_that_saved(run_dir, 3) == ["ocdbt.process_0", "ocdbt.process_1"]


@pytest.mark.parametrize("fault", ["no-git", "too-few-arguments"])
def test_tpu_pod_recipe_refuses_in_one_line_and_touches_no_worker(tmp_path, shell_env, fault):
    """Where git cannot list the repository's files (no git, or not a checkout), or the
    arguments are short, the recipe ends in one line that says so, before any gcloud call."""
    fake_root = tmp_path / "tpu"
    fake_root.mkdir()
    env = {**shell_env, "FAKE_TPU_ROOT": str(fake_root), "FAKE_TPU_WORKERS": "2"}
    args = ["my-tpu", "us-central2-b", "my-project", str(tmp_path / "run"), "--", "train",
            "configs/tiny.yaml"]
    if fault == "no-git":
        git = Path(env["PATH"].split(":")[0]) / "git"
        git.write_text("#!/bin/sh\necho 'fatal: not a git repository' >&2\nexit 128\n")
        git.chmod(0o755)
    else:
        args = args[:3]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "tpu_pod.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert (str(ROOT) in lines[0] and "git" in lines[0]) if fault == "no-git" else \
        lines[0].startswith("usage: scripts/tpu_pod.sh")
    assert not (fake_root / "calls.log").exists()
    assert not (tmp_path / "run").exists()
