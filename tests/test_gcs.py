"""Run directories on Google Cloud Storage, against a GCS emulator on 127.0.0.1: training,
the lock, a refused resume, an exact resume, eval / generate / api.load / convert reading from
the bucket, a damaged checkpoint. One run goes through all of it (each step costs a training
process)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from helpers import run_cli

BUCKET = "llama-jax-test"
# A constant learning rate: a run's first leg (10 steps) then matches an uninterrupted 15.
TRAIN = ["train", "tiny", "data.dataset=python_docs", "checkpoint.every=5",
         "train.log_every=5", "train.eval_every=0", "optimizer.schedule=constant"]


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment for the clients: gcsfs and google-cloud-storage read
    STORAGE_EMULATOR_HOST, TensorStore its own two variables."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "gcs_emulator.py"),
                               BUCKET], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
               # gcsfs's probe for zonal buckets needs a gRPC API the emulator lacks
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield env
    finally:
        server.kill()
        server.wait()


def bucket_snapshot(prefix: str) -> dict[str, str]:
    """Every object under gs://BUCKET/prefix, by name, as a digest of its bytes."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    return {name: hashlib.sha256(fs.cat_file(name)).hexdigest()
            for name in sorted(fs.find(f"{BUCKET}/{prefix}"))}


def _train_rows(run: str) -> list[tuple[int, float]]:
    from etils import epath

    rows = [json.loads(line) for line in epath.Path(f"{run}/metrics.jsonl").read_text()
            .splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "grad_norm" in r]


def test_a_run_on_gcs_trains_resumes_exactly_is_read_back_and_survives_damage(gcs, tmp_path):
    run = f"gs://{BUCKET}/run"
    first = run_cli(*TRAIN, f"run_dir={run}", "train.steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    objects = bucket_snapshot("run")
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.model"):
        assert f"{BUCKET}/run/{name}" in objects
    assert any(n.startswith(f"{BUCKET}/run/tb/events.out.tfevents") for n in objects)
    assert any(n.startswith(f"{BUCKET}/run/checkpoints/10/") for n in objects)
    assert f"{BUCKET}/run/.lock" not in objects  # released at the end

    # A live holder keeps the run: a second train is refused in one line, nothing changes.
    import psutil
    from etils import epath

    lock = epath.Path(f"{run}/.lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.time(), "heartbeat": time.time(),
                                "process_start": psutil.Process().create_time()}))
    before = bucket_snapshot("run")
    held = run_cli(*TRAIN, f"run_dir={run}", "train.steps=15")
    assert held.returncode == 2 and "is in use by another train" in held.stderr
    assert bucket_snapshot("run") == before
    lock.unlink()
    from llama_jax.storage import create_exclusive

    probe = epath.Path(f"gs://{BUCKET}/probe/.lock")
    assert create_exclusive(probe, b"first") and not create_exclusive(probe, b"second")
    assert probe.read_bytes() == b"first"

    # A resume the saved state cannot take is refused, and the bucket is left as it was.
    before = bucket_snapshot("run")
    refused = run_cli(*TRAIN, f"run_dir={run}", "train.steps=15", "model.hidden_size=64")
    assert refused.returncode == 2 and "model.hidden_size: 128 -> 64" in refused.stderr
    assert bucket_snapshot("run") == before

    # Resumed to 15, the run equals an uninterrupted local one, step for step.
    resumed = run_cli(*TRAIN, f"run_dir={run}", "train.steps=15")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/10" in resumed.stderr
    local = run_cli(*TRAIN, f"run_dir={tmp_path / 'local'}", "train.steps=15")
    assert local.returncode == 0, local.stderr[-3000:]
    assert _train_rows(run) == _train_rows(str(tmp_path / "local"))
    assert [step for step, _ in _train_rows(run)] == [5, 10, 15]

    # eval, generate and api.load read the run from the bucket.
    evaluated = run_cli("eval", run, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    local_eval = json.loads(run_cli("eval", str(tmp_path / "local"), "--json").stdout)
    assert result["step"] == 15 and result["loss"] == pytest.approx(local_eval["loss"], rel=1e-6)
    sampled = run_cli("generate", run, "--prompt", "def", "--max-new-tokens", "4",
                      "--temperature", "0")
    assert sampled.returncode == 0 and "def" in sampled.stdout, sampled.stderr[-3000:]
    from llama_jax import api

    model = api.load(run, ["mesh.fsdp=8"])
    assert model.logits([[1, 2, 3]]).shape[-1] == model.cfg.model.vocab_size

    # convert reads from the bucket too; it writes local folders only, and says so.
    converted = run_cli("convert", "orbax-to-hf", run, str(tmp_path / "hf"))
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == epath.Path(
        f"{run}/tokenizer.model").read_bytes()  # the run's tokenizer, read from the bucket
    remote_out = run_cli("convert", "orbax-to-hf", run, f"gs://{BUCKET}/hf")
    assert remote_out.returncode != 0 and "write to a local folder" in remote_out.stderr
    assert len(remote_out.stderr.strip().splitlines()) == 1


    # A damaged checkpoint there is set aside (copied to damaged-15, then deleted) and the run
    # goes on from the one before.
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    data = [n for n in fs.find(f"{BUCKET}/run/checkpoints/15/state") if "/d/" in n]
    assert data
    for name in data:  # halve every array-data object
        fs.pipe_file(name, fs.cat_file(name)[: fs.size(name) // 2])
    again = run_cli(*TRAIN, f"run_dir={run}", "train.steps=20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoints/15 is damaged" in again.stderr and "falling back" in again.stderr
    assert f"resuming from {run}/checkpoints/10" in again.stderr
    names = bucket_snapshot("run")
    assert any(n.startswith(f"{BUCKET}/run/checkpoints/damaged-15/") for n in names)
    assert any(n.startswith(f"{BUCKET}/run/checkpoints/20/") for n in names)

    # A save cut short on an object store: Orbax wrote the step in place but never its
    # commit file. The next train names it, resumes from the one before and saves it again.
    fs.rm_file(f"{BUCKET}/run/checkpoints/20/commit_success.txt")
    cut = run_cli(*TRAIN, f"run_dir={run}", "train.steps=20")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {run}/checkpoints/20" in cut.stderr
    assert f"resuming from {run}/checkpoints/15" in cut.stderr  # saved again on the way to 20
    assert fs.exists(f"{BUCKET}/run/checkpoints/20/commit_success.txt")
