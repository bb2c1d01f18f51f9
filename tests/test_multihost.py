"""Real multi-process runs: 2 local processes x 4 CPU devices, gloo collectives."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT
from helpers import metrics_rows, run_cli

TRAIN = ["train", "configs/tiny.yaml", "train.steps=10", "train.log_every=1", "mesh.data=2",
         "mesh.fsdp=4", "checkpoint.every=5"]


def rows(run_dir):
    return metrics_rows(run_dir)


def launch(*args):
    return run_cli("launch", "--processes", "2", "--devices-per-process", "4", "--", *args)


def eval_loss(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    two = launch(*TRAIN, f"run_dir={root / 'two'}")
    assert two.returncode == 0, two.stderr
    assert "[Gloo]" not in two.stdout + two.stderr  # its per-rank lines are off by default
    one = run_cli(*TRAIN, f"run_dir={root / 'one'}")
    assert one.returncode == 0, one.stderr
    return root


def test_two_processes_equal_one(runs):
    two, one = rows(runs / "two"), rows(runs / "one")
    losses_two = [r["loss"] for r in two if "grad_norm" in r]
    losses_one = [r["loss"] for r in one if "grad_norm" in r]
    assert len(losses_two) == 10
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    # process 0 alone writes: one row per logged step (10) and per evaluation (steps 0, 10)
    assert len(two) == len(one) == 12


def test_checkpoints_cross_process_counts(runs):
    one_reads_two = eval_loss(run_cli("eval", str(runs / "two"), "--json", "--batches", "2"))
    two_reads_one = eval_loss(launch("eval", str(runs / "one"), "--json", "--batches", "2"))
    same_run = eval_loss(run_cli("eval", str(runs / "one"), "--json", "--batches", "2"))
    assert one_reads_two == pytest.approx(same_run, rel=1e-5)
    assert two_reads_one == pytest.approx(same_run, rel=1e-5)


def test_a_dead_peer_stops_the_survivor(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "LLAMA_JAX_COORDINATOR": f"127.0.0.1:{port}", "LLAMA_JAX_NUM_PROCESSES": "2",
               "LLAMA_JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llama_jax.cli", "train", "configs/tiny.yaml",
             f"run_dir={tmp_path}", "train.steps=100000", "train.log_every=1",
             "distributed.timeout_s=15"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 240
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file()
                                          and len(rows(tmp_path)) >= 3):
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 60
    # jaxlib's fatal log (or, when gloo notices first, std::terminate) becomes one line
    [line] = err.strip().splitlines()
    assert line.startswith("distributed: process 0 stopped: "), line
    assert ("process 1 stopped sending heartbeats" in line
            or "a gloo collective failed" in line), line
    report = Path(re.search(r"\(full report: (\S+)\)$", line).group(1))
    assert "Terminating process" in report.read_text() or "gloo::" in report.read_text()
    report.unlink()


def test_unreachable_coordinator_is_one_line(tmp_path):
    env = {"LLAMA_JAX_COORDINATOR": "127.0.0.1:1", "LLAMA_JAX_NUM_PROCESSES": "2",
           "LLAMA_JAX_PROCESS_ID": "1"}
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}",
                     "distributed.timeout_s=5", env=env, timeout=120)
    assert result.returncode != 0
    assert "distributed: could not join 127.0.0.1:1 within 5s" in result.stderr.strip()


def test_launcher_reports_a_failing_process(tmp_path):
    result = launch("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "model.num_heads=3")
    assert result.returncode != 0
    assert "exited with status" in result.stderr


@pytest.mark.parametrize("target", ["peer", "launcher"])
def test_a_signal_to_one_process_stops_all_at_one_step_with_a_checkpoint(tmp_path, target):
    """A SIGTERM to one process (a scheduler's notice to one host), or a SIGKILL to the
    launcher (each process gets a SIGTERM as it dies), stops every process after the same
    step, with a checkpoint of it: before, the signalled one saved while the others stepped
    on, and both hung until the watchdog ended them with nothing saved."""
    run = ["train", "configs/tiny.yaml", "optimizer.schedule=constant", "train.log_every=1",
           "mesh.data=2", "mesh.fsdp=4", "checkpoint.every=100000"]
    cut, logs = tmp_path / "cut", tmp_path / "logs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llama_jax.cli", "launch", "--processes", "2",
         "--devices-per-process", "4", "--log-dir", str(logs), "--", *run, f"run_dir={cut}",
         "train.steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((cut / "metrics.jsonl").is_file() and len(
            [r for r in rows(cut) if "grad_norm" in r]) >= 3):
        time.sleep(0.5)
    processes = psutil.Process(launcher.pid).children()
    try:
        assert len(processes) == 2
        if target == "peer":
            [peer] = [p for p in processes if p.environ()["LLAMA_JAX_PROCESS_ID"] == "1"]
            peer.send_signal(signal.SIGTERM)
        else:
            launcher.kill()
        _, err = launcher.communicate(timeout=300)  # process 0 holds the pipe until it ends
        _, alive = psutil.wait_procs(processes, timeout=120)
        assert not alive
    finally:  # a failure leaves no process training on
        for p in [launcher, *processes]:
            with contextlib.suppress(Exception):
                p.kill()
    assert launcher.returncode == (143 if target == "peer" else -signal.SIGKILL)
    said = [err.strip().splitlines()[-1], (logs / "process-1.log").read_text().strip()
            .splitlines()[-1]]
    steps = {int(m.group(1)) for m in (re.search(
        r"stopped by SIGTERM to one of the 2 processes after step (\d+); checkpoint saved in "
        + re.escape(str(cut / "checkpoints")), line) for line in said) if m}
    assert len(steps) == 1, said  # both processes, one step
    [step] = steps
    from llama_jax.checkpoint import Checkpointer
    from llama_jax.config import load_config

    assert Checkpointer(load_config(cut / "config.yaml"), cut / "checkpoints",
                        read_only=True).steps() == [step]
    if target == "launcher":
        return
    # The checkpoint resumes (that a resume is exact across processes is
    # test_two_processes_resume_a_mixture_exactly_and_count_it_once's).
    resumed = launch(*run, f"run_dir={cut}", f"train.steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {cut / 'checkpoints' / str(step)}" in resumed.stderr
    assert [r["step"] for r in rows(cut) if "grad_norm" in r] == list(range(1, step + 3))


@pytest.mark.slow
def test_generate_under_two_processes_matches_one(tmp_path):
    run = ["train", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", "train.steps=2",
           "data.dataset=python_docs", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_cli(*run).returncode == 0
    # 8 rows: the batch shards over both processes' devices, whose tokens each must read.
    gen = ["generate", str(tmp_path / "run"), "--prompt", "The", "--prompt", "A",
           "--max-new-tokens", "6", "--num-samples", "4", "--temperature", "0.8"]
    two, one = launch(*gen), run_cli(*gen)
    assert two.returncode == 0, two.stderr
    assert one.returncode == 0, one.stderr
    assert two.stdout.count("--- sample") == 8
    assert two.stdout.strip().splitlines()[-16:] == one.stdout.strip().splitlines()[-16:]


@pytest.mark.slow
def test_sweep_under_two_processes(tmp_path):
    """Each layout runs as two coordinated processes (its own coordinator port); process 0
    alone reports, and a layout's figures match what one process with 8 devices compiles."""
    layouts = ["--layouts", "data=2,fsdp=4;fsdp=8", "--steps", "2"]
    two = launch("sweep", "configs/tiny.yaml", *layouts, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 3
    one = run_cli("sweep", "configs/tiny.yaml", *layouts, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    rows = {}
    for name in ("two", "one"):
        result = json.loads((tmp_path / name / "sweep.json").read_text())
        assert result["devices"] == 8
        rows[name] = {r["layout"]: r for r in result["rows"]}
    assert set(rows["two"]) == {"data=2,fsdp=4", "fsdp=8"}
    for layout, row in rows["two"].items():
        assert row["status"] == "ok" and row["tokens_per_sec"] > 0
        assert row["argument_gib"] == pytest.approx(rows["one"][layout]["argument_gib"])


GLOO_CHATTER = """
import os, sys, time
from llama_jax.output_filter import LineFilter
LineFilter.install(b"[Gloo] ")
print("first line", flush=True)
os.write(1, b"[Glo")
time.sleep(0.05)
os.write(1, b"o] Rank 0 is connected to 1 peer ranks\\nkept: [Gloo] not at the start\\n")
os.write(1, b"[Gl")
time.sleep(0.05)
os.write(1, b"ad] starts alike\\nprogress 1\\rprogress 2")
sys.stdout.write("\\n[Gloo] Rank 1 too\\nno newline at the end")
"""


def test_gloo_lines_are_dropped_from_stdout_and_nothing_else():
    """gloo writes from C++ to fd 1, in pieces; only whole lines starting "[Gloo] " go."""
    done = subprocess.run([sys.executable, "-c", GLOO_CHATTER], capture_output=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (b"first line\nkept: [Gloo] not at the start\n[Glad] starts alike\n"
                           b"progress 1\rprogress 2\nno newline at the end")


GLOO_ABORT = """
import os, sys, time
from llama_jax.output_filter import FatalReport
FatalReport.install(3)
print("a warning before", file=sys.stderr, flush=True)
os.write(2, b"progress 1\\rprogress 2\\nF1 is not a fatal line\\nterm")
time.sleep(0.05)
os.write(2, b"inate called after throwing an instance of 'gloo::EnforceNotMet'\\n"
            b"  what():  [enforce fail at gloo/transport/tcp/pair.cc:446] op.preamble.length"
            b" <= op.nbytes. 32768 vs 4. Received data size doesn't match\\n")
os.abort()
"""


def test_a_cpp_abort_on_stderr_becomes_one_line():
    """What precedes the abort's report passes unchanged; the report goes to a file."""
    done = subprocess.run([sys.executable, "-c", GLOO_ABORT], capture_output=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode != 0
    *before, line = done.stderr.decode().rstrip("\n").split("\n")
    assert before == ["a warning before", "progress 1\rprogress 2", "F1 is not a fatal line"]
    assert line.startswith(
        "distributed: process 3 stopped: a gloo collective failed, most likely because a peer "
        "process died or was stopped (gloo::EnforceNotMet: op.preamble.length <= op.nbytes. "
        "32768 vs 4."), line
    report = Path(re.search(r"\(full report: (\S+)\)$", line).group(1))
    assert report.read_text().startswith("terminate called after throwing")
    report.unlink()


def test_two_processes_resume_a_mixture_exactly_and_count_it_once(tmp_path):
    """Each process's iterator position is saved (process 0 writes the data state for all)
    and the per-source tally is summed over processes and restored once: 4 steps and a
    resume to 6 on two processes write the rows of 6 steps in one go, and count every token
    of 6 global batches."""
    from test_mixture import LETTERS, mixture, untimed, write_corpus

    from llama_jax.config import load_config

    long = write_corpus(tmp_path / "long.jsonl", 0, 200, (100, 300), LETTERS[:13])
    short = write_corpus(tmp_path / "short.jsonl", 1, 800, (5, 30), LETTERS[13:])
    run = ["train", "configs/tiny.yaml", mixture(long, short), "optimizer.schedule=constant",
           f"data.cache_dir={tmp_path / 'cache'}", "train.log_every=2", "checkpoint.every=2",
           "mesh.data=2", "mesh.fsdp=4"]
    for args in (["train.steps=4", f"run_dir={tmp_path / 'cut'}"],
                 ["train.steps=6", f"run_dir={tmp_path / 'cut'}"],
                 ["train.steps=6", f"run_dir={tmp_path / 'whole'}"]):
        done = launch(*run, *args)
        assert done.returncode == 0, done.stderr
    cut = [r for r in rows(tmp_path / "cut") if "grad_norm" in r]
    assert untimed(cut) == untimed([r for r in rows(tmp_path / "whole") if "grad_norm" in r])
    tiny = load_config("tiny")
    per_step = tiny.train.global_batch_size * tiny.data.seq_len
    counted = [r["tokens_by_source"] for r in cut]
    assert [sum(c.values()) for c in counted] == [2 * per_step, 4 * per_step, 6 * per_step]
    assert all(c["long"] > c["short"] > 0 for c in counted)


def test_evaluation_scores_the_same_rows_on_any_process_count(tmp_path):
    """`eval` of a text mixture, over its whole validation split and over its first batches:
    two processes score the same tokens as one, with the same loss overall and by source.
    Each process used to pack its own share of the documents, which made other rows (68,078
    tokens and loss 6.0478 on two processes against 68,064 and 6.0431 on one, for
    python_docs)."""
    from test_mixture import LETTERS, mixture, write_corpus

    long = write_corpus(tmp_path / "long.jsonl", 0, 200, (100, 300), LETTERS[:13])
    short = write_corpus(tmp_path / "short.jsonl", 1, 800, (5, 30), LETTERS[13:])
    run = tmp_path / "run"
    done = run_cli("train", "configs/tiny.yaml", mixture(long, short), "train.steps=2",
                   f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}",
                   "data.validation_fraction=0.2")
    assert done.returncode == 0, done.stderr
    for batches in ([], ["--batches", "3"]):
        results = []
        for command in (run_cli, launch):
            done = command("eval", str(run), "--json", *batches)
            assert done.returncode == 0, done.stderr
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        one, two = results
        assert two["tokens"] == one["tokens"]
        assert two["tokens_by_source"] == one["tokens_by_source"]
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["loss_by_source"] == pytest.approx(one["loss_by_source"], rel=1e-6)
