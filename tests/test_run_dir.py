"""A run directory is never damaged by a command: refused resumes change nothing, one
writer at a time, torn metrics lines, boolean-like settings."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, resize
from helpers import run_cli

from llama_jax.config import load_config


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file's bytes (as a digest) and every folder, by relative path."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic run with checkpoints at 5 and 10, saved as data=2 x fsdp=4."""
    run_dir = tmp_path_factory.mktemp("run")
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={run_dir}", "checkpoint.every=5",
                   "train.steps=10", "mesh.data=2", "mesh.fsdp=4")
    assert done.returncode == 0, done.stderr
    return run_dir


@pytest.mark.parametrize("overrides, named", [
    (["model.hidden_size=64"], "model.hidden_size: 128 -> 64"),
    (["optimizer.clip_norm=0"], "optimizer.clip_norm: 1.0 -> 0.0"),
    (["model.param_dtype=bfloat16", "data.seq_len=32"],
     "data.seq_len: 64 -> 32; model.param_dtype: 'float32' -> 'bfloat16'"),
    (["mesh.data=3", "mesh.fsdp=1"], "3 devices, but 8 are available"),
    (["train.steps=7"], "train.steps=7 is behind the state this run starts from (step 10"),
])
def test_refused_resume_leaves_the_run_byte_for_byte(run, overrides, named):
    before = snapshot(run)
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={run}", "checkpoint.every=5",
                   "train.steps=20", "mesh.data=2", "mesh.fsdp=4", *overrides)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert snapshot(run) == before


def test_a_refused_new_run_leaves_no_folder_behind(tmp_path):
    """The folders a new run's start made (and Orbax's checkpoints/) are removed again when it
    is refused before writing anything; a folder that was there stays."""
    (tmp_path / "kept").mkdir()
    for run_dir, refused, why in [
            (tmp_path / "new" / "deeper", "mesh.data=3", "does not divide the 8 devices"),
            (tmp_path / "kept", "mesh.data=3", "does not divide the 8 devices"),
            (tmp_path / "kept", f"checkpoint.restore_from={tmp_path / 'none'}", "no such run"),
            (tmp_path / "a-file", "", f"run_dir: {tmp_path / 'a-file'} is not a directory"),
            (tmp_path / "a-file" / "run", "", f"run_dir: {tmp_path / 'a-file'} is not a dir")]:
        (tmp_path / "a-file").write_text("notes")
        done = run_cli("train", "configs/tiny.yaml", f"run_dir={run_dir}",
                       *([refused] if refused else []))
        [line] = done.stderr.strip().splitlines()
        assert done.returncode == 2 and why in line, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    assert (tmp_path / "a-file").read_text() == "notes"


def test_resume_applies_and_lists_allowed_changes(tmp_path):
    """Allowed changes are applied and listed; a torn last metrics line (a crash mid-write)
    is dropped with a note, and the rows read as one uninterrupted run."""
    first = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "checkpoint.every=5",
                    "train.steps=10", "mesh.fsdp=8", "train.log_every=1")
    assert first.returncode == 0, first.stderr
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 11, "loss": 3.1')
    again = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "checkpoint.every=4",
                    "train.steps=12", "mesh.fsdp=4", "mesh.tensor=2", "optimizer.lr=1e-3",
                    "train.log_every=1")
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr and "checkpoints/10" in again.stderr
    note = next(line for line in again.stderr.splitlines() if "changed settings" in line)
    for change in ("train.steps: 10 -> 12", "mesh.tensor: 1 -> 2", "optimizer.lr: 0.003 -> 0.001",
                   "checkpoint.every: 5 -> 4"):
        assert change in note
    assert load_config(tmp_path / "config.yaml").train.steps == 12
    assert (tmp_path / "checkpoints" / "12").is_dir()
    assert "dropping a torn last line" in again.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "grad_norm" in r] == list(range(1, 13))
    # The closing line sets the run's first validation against its last, across sessions.
    start, end = (next(r["loss"] for r in rows if "perplexity" in r and r["step"] == s)
                  for s in (0, 12))
    assert f"validation loss: {start:.4f} at step 0 -> {end:.4f} at step 12" in again.stdout


def test_a_checkpoint_that_does_not_fit_is_not_called_damaged(tmp_path):
    """Without the saved config to compare with, a shape mismatch surfaces at restore: it is
    refused in one line and the checkpoint keeps its name (it is not set aside)."""
    first = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=5")
    assert first.returncode == 0, first.stderr
    (tmp_path / "config.yaml").unlink()
    before = snapshot(tmp_path)
    again = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=8",
                    "model.intermediate_size=128")
    assert again.returncode == 2
    assert "does not fit this config" in again.stderr.strip().splitlines()[-1]
    assert snapshot(tmp_path) == before


def _lock_record(pid: int, host: str | None = None, heartbeat: float | None = None) -> dict:
    proc = psutil.Process(pid)
    now = time.time()
    return {"host": host or socket.gethostname(), "pid": pid, "started": now,
            "process_start": proc.create_time(), "heartbeat": heartbeat or now}


def test_second_writer_is_refused(tmp_path):
    """A live holder (this test process, on this host) keeps the directory; the refused
    train names it and changes nothing."""
    (tmp_path / ".lock").write_text(json.dumps(_lock_record(os.getpid())))
    before = snapshot(tmp_path)
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=3")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "is in use by another train" in line and f"pid {os.getpid()}" in line
    assert snapshot(tmp_path) == before


def test_two_trains_at_once_one_is_refused(tmp_path):
    args = [sys.executable, "-m", "llama_jax.cli", "train", "configs/tiny.yaml",
            f"run_dir={tmp_path}", "train.steps=400"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".lock").is_file() and time.time() < deadline:
            time.sleep(0.1)
        second = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=400")
        assert second.returncode == 2
        assert "is in use by another train" in second.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("holder", ["dead-pid", "stale-heartbeat-elsewhere"])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, holder):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    record = _lock_record(dead.pid)
    dead.wait()
    if holder == "stale-heartbeat-elsewhere":
        record = _lock_record(os.getpid(), host="other-host", heartbeat=time.time() - 3600)
    (tmp_path / ".lock").write_text(json.dumps(record))
    done = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=3")
    assert done.returncode == 0, done.stderr
    assert "taking over" in done.stderr
    assert not (tmp_path / ".lock").exists()  # released at the end


@pytest.mark.parametrize("value, expected", [("true", "true"), ("False", "false"),
                                             ("auto", "auto")])
def test_boolean_like_choices_from_the_command_line_and_yaml(tmp_path, value, expected):
    assert load_config("configs/tiny.yaml",
                       [f"distributed.enabled={value}"]).distributed.enabled == expected
    preset = tmp_path / "p.yaml"
    preset.write_text(f"base: tiny\ndistributed:\n  enabled: {value}\n")
    assert load_config(preset).distributed.enabled == expected


def test_disk_full_is_one_line_and_the_run_resumes_once_fixed(small_fs):
    run_dir = small_fs / "run"
    args = ["train", "configs/tiny.yaml", f"run_dir={run_dir}", "checkpoint.every=5",
            "checkpoint.keep=1"]
    full = run_cli(*args, "train.steps=30")
    assert full.returncode != 0
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, full.stderr
    assert "checkpoint save" in lines[0] and str(run_dir / "checkpoints") in lines[0]
    assert "No space left on device" in lines[0]  # the cause, at the end of a long line
    # Fixed: more room. The run resumes from its last complete checkpoint, if any.
    resize(small_fs, "64m")
    resumed = run_cli(*args, "train.steps=12")
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "checkpoints" / "12").is_dir()


@pytest.mark.parametrize("size, where", [("1m", "corpus/python_docs-"),
                                         ("3m", "text/python_docs-")])
def test_a_full_disk_while_preparing_data_is_one_line_and_leaves_no_part(small_fs, size, where):
    """The corpus file (a Python write) and the array_record shards (whose writer raises a
    RuntimeError) on a full disk: one line naming the file, and its part removed."""
    resize(small_fs, size)
    done = run_cli("prepare-data", "configs/default.yaml", f"data.cache_dir={small_fs}")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert f"{small_fs}/{where}" in lines[0] and "No space left on device" in lines[0]
    left = [p.name for p in small_fs.rglob("*") if p.suffix in (".tmp", ".partial")]
    assert left == []


def test_read_only_run_dir_is_one_line_and_changes_nothing(small_fs):
    resize(small_fs, "64m")
    run_dir = small_fs / "run"
    args = ["train", "configs/tiny.yaml", f"run_dir={run_dir}", "checkpoint.every=5"]
    assert run_cli(*args, "train.steps=5").returncode == 0
    before = snapshot(run_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    refused = run_cli(*args, "train.steps=10")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert lines == [f"llama-jax train: error: run_dir: {run_dir} is on a read-only file "
                     f"system"], refused.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert snapshot(run_dir) == before


def test_yaml_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n   num_layers: 2\n")
    done = run_cli("info", str(bad))
    assert done.returncode == 2
    assert f"{bad}:3:" in done.stderr and "invalid YAML" in done.stderr


@pytest.mark.parametrize("flag, value, why", [
    ("--processes", "0", "--processes must be at least 1"),
    ("--devices-per-process", "0", "--devices-per-process must be at least 1"),
    ("--port", "99999", "argument --port: must be >= 0 and <= 65535, got 99999")])
def test_launch_refuses_impossible_numbers(flag, value, why):
    args = ["--processes", "2", "--devices-per-process", "1", "--port", "0"]
    args[args.index(flag) + 1] = value
    done = run_cli("launch", *args, "--", "info", "configs/tiny.yaml")
    assert done.returncode == 2 and why in done.stderr.strip().splitlines()[-1]


def test_launch_keeps_its_log_folder_only_after_a_failure(tmp_path):
    """Each launch left the other processes' logs in a new temporary folder, success or not:
    a test suite's worth piled up in /tmp. Now only a failure keeps them, to be read."""
    launch = ["launch", "--processes", "2", "--devices-per-process", "1", "--", "info"]
    temp = {"TMPDIR": str(tmp_path)}
    done = run_cli(*launch, "configs/tiny.yaml", env=temp)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("llama_jax_launch_*"))
    done = run_cli(*launch, str(tmp_path / "missing.yaml"), env=temp)
    assert done.returncode == 2
    [kept] = tmp_path.glob("llama_jax_launch_*")
    assert "missing.yaml" in (kept / "process-1.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1"),
    (["--temperature", "-1"], "--temperature: must be >= 0.0"),
    (["--top-p", "2"], "--top-p: must be > 0.0 and <= 1.0"),
    (["--top-p", "0"], "--top-p: must be > 0.0 and <= 1.0"),
    (["--top-k", "-3"], "--top-k: must be >= 0"),
    (["--top-k", "5000"], "--top-k 5000 exceeds the vocabulary (1024 tokens)"),
    (["--num-samples", "0"], "--num-samples: must be >= 1"),
    (["--prompt-ids", "1,2,4096"], "token id 4096 is outside the vocabulary (1024 tokens"),
    (["--prompt-ids", "1,,2"], "--prompt-ids '1,,2': expected comma-separated token ids"),
    (["--prompt-ids", "1,2;3"], "--prompt-ids '1,2;3': expected comma-separated token ids"),
    (["--prompt-ids", ""], "every prompt needs at least one token"),
    (["--prompt", "The"], "has no tokenizer (none beside its weights: trained on synthetic"),
    (["data.tokenizer=/nowhere/t.model", "--prompt", "The"],
     "data.tokenizer: file not found: /nowhere/t.model"),
    ([], "give a prompt"),
])
def test_generate_arguments_are_checked_in_one_line(run, args, message):
    if "--prompt" not in args and "--prompt-ids" not in args and args:
        args = [*args, "--prompt-ids", "1,2,3"]
    done = run_cli("generate", str(run), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    # The last line says it (argparse prints its usage above); never a traceback.
    assert message in lines[-1] and "Traceback" not in done.stderr, done.stderr


def test_generate_on_a_synthetic_run_takes_token_ids(run):
    done = run_cli("generate", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    ids = done.stdout.strip().splitlines()[-1].split()
    assert ids[:3] == ["1", "2", "3"] and len(ids) == 7


@pytest.mark.parametrize("args, message", [
    (["--batches", "-1"], "--batches: must be >= 0"),
    (["--split", "test"], "invalid choice: 'test'"),
])
def test_eval_arguments_are_checked(run, args, message):
    done = run_cli("eval", str(run), *args)
    assert done.returncode == 2 and message in done.stderr


def test_api_refuses_ids_outside_the_vocabulary(run):
    from llama_jax import api
    from llama_jax.errors import LlamaJaxError

    m = api.load(run)
    with pytest.raises(LlamaJaxError, match="token id 1024 is outside the vocabulary"):
        m.logits([[1, 2, 1024]])
    with pytest.raises(LlamaJaxError, match="token id -1 is outside"):
        m.generate([[1, -1]], max_new_tokens=2)


def test_eval_and_api_restore_onto_the_devices_at_hand(run):
    """The run saved as data=2 x fsdp=4 on 8 devices evaluates in a shell with 1 device (the
    layout that fits is said in a note), and a layout named in overrides is the whole layout
    (`mesh.fsdp=4 mesh.tensor=2` does not keep the saved data=2)."""
    one = run_cli("eval", str(run), "--json", "--batches", "1",
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert one.returncode == 0, one.stderr
    assert "saved layout does not fit here" in one.stderr and "fsdp=1" in one.stderr
    eight = run_cli("eval", str(run), "--json", "--batches", "1")
    assert json.loads(one.stdout)["loss"] == pytest.approx(json.loads(eight.stdout)["loss"],
                                                           rel=1e-5)
    from llama_jax import api

    m = api.load(run, ["mesh.fsdp=4", "mesh.tensor=2"])
    assert (m.cfg.mesh.data, m.cfg.mesh.fsdp, m.cfg.mesh.tensor) == (1, 4, 2)
    assert m.logits([[1, 2, 3]]).shape == (1, 3, 1024)
