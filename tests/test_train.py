"""Sharded training: layouts agree, refused meshes, what a run writes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import LAYOUTS, layout_overrides, run_cli, tiny

from llama_jax.config import load_config
from llama_jax.train import train


def test_losses_equal_across_layouts(tmp_path):
    losses = {}
    for layout in LAYOUTS:
        cfg = tiny(tmp_path / layout, "train.steps=10", "train.log_every=1",
                   *layout_overrides(layout))
        result = train(cfg, quiet=True)
        losses[layout] = np.array([row["loss"] for row in result.history])
    reference = losses["data=8"]
    assert len(reference) == 10 and reference[-1] < reference[0]
    for layout, values in losses.items():
        np.testing.assert_allclose(values, reference, rtol=1e-4, err_msg=layout)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3", "mesh.fsdp=1"], "mesh data=3 x fsdp=1 x sequence=1 x tensor=1 = 3 devices, "
                                     "but 8 are available"),
    (["mesh.tensor=8", "mesh.fsdp=1"], "mesh.tensor=8 does not divide model.num_heads=4"),
    (["mesh.tensor=4", "mesh.fsdp=2"], "mesh.tensor=4 does not divide model.num_kv_heads=2"),
    (["mesh.data=8", "mesh.fsdp=1", "train.global_batch_size=4"],
     "mesh data x fsdp = 8 x 1 = 8 does not divide train.global_batch_size=4"),
    (["mesh.sequence=8", "mesh.fsdp=1", "data.seq_len=60"],
     "mesh.sequence=8 does not divide data.seq_len=60"),
    (["mesh.fsdp=3", "mesh.data=-1"], "mesh.data=-1 cannot be filled"),
    (["mesh.dcn_data=2", "mesh.fsdp=4"],
     "mesh dcn_* factors multiply to 2, but the devices come from 1 processes"),
])
def test_refused_meshes_exit_with_one_line(tmp_path, overrides, message):
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", *overrides)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_train_cli_writes_metrics_tensorboard_and_config(tmp_path):
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=10",
                     "train.log_every=5", "train.eval_every=5")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "grad_norm" in r]
    assert [r["step"] for r in train_rows] == [5, 10]
    for key in ("step", "loss", "grad_norm", "lr", "tokens_per_sec", "mfu"):
        assert key in train_rows[-1]
    assert train_rows[-1]["tokens_per_sec"] > 0 and 0 < train_rows[-1]["mfu"] < 1
    assert any((tmp_path / "tb").iterdir())
    assert load_config(tmp_path / "config.yaml").train.steps == 10
    # The summary says what its validation loss covered, so it is not confused with `eval`'s.
    summary = re.search(r"validation loss: .* \(over ([\d,]+) tokens, train.eval_batches=(\d+)",
                        result.stdout)
    assert summary, result.stdout
    cfg = load_config(tmp_path / "config.yaml")
    per_batch = cfg.train.global_batch_size * cfg.data.seq_len
    assert int(summary[1].replace(",", "")) == int(summary[2]) * per_batch


def test_nan_loss_stops_with_the_step(tmp_path):
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=6",
                     "train.log_every=3", "model.init_std=1e30")
    assert result.returncode != 0
    # Weights of 1e30 saturate the softmax to uniform: a finite loss, non-finite gradients.
    assert result.stderr.strip().splitlines()[-1] == (
        "llama-jax train: error: step 1: the gradients are NaN/Inf (the loss is finite) "
        "(train.on_nonfinite=stop); stopped, no checkpoint was written")


def test_profile_steps_write_a_trace(tmp_path):
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=6",
                     "train.profile_start=3", "train.profile_steps=2")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
