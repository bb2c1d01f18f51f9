"""Sharded training: layouts agree, placement follows the rules, the optimizer is right."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS
from flax import nnx
from helpers import run_cli
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.config import load_config
from llama_jax.data.batch import to_global
from llama_jax.data.synthetic import SyntheticSource
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer
from llama_jax.train import gradients, init_state, make_setup, make_train_step, train

LAYOUTS = [
    "data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2", "data=2,tensor=2,fsdp=2",
    "sequence=2,fsdp=4",
]


def layout_overrides(layout: str) -> list[str]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    sizes.update({k: int(v) for k, v in (kv.split("=") for kv in layout.split(","))})
    return [f"mesh.{k}={v}" for k, v in sizes.items()]


def tiny(tmp_path, *overrides):
    return load_config(CONFIGS / "tiny.yaml", [f"run_dir={tmp_path}", *overrides])


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


EXPECTED_SPECS = {  # data=2, fsdp=2, tensor=2 under the default rules
    "embed": P("tensor", "fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "final_norm/scale": P(),
    "layers/attn_norm/scale": P(),
    "layers/mlp_norm/scale": P(),
    "layers/attn/q_proj": P(None, "fsdp", "tensor"),
    "layers/attn/k_proj": P(None, "fsdp", "tensor"),
    "layers/attn/v_proj": P(None, "fsdp", "tensor"),
    "layers/attn/o_proj": P(None, "tensor", None, "fsdp"),
    "layers/mlp/gate_proj": P(None, "fsdp", "tensor"),
    "layers/mlp/up_proj": P(None, "fsdp", "tensor"),
    "layers/mlp/down_proj": P(None, "tensor", "fsdp"),
}


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _norm_spec(spec):
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def test_parameter_and_optimizer_placement_follows_rules(tmp_path):
    cfg = tiny(tmp_path, *layout_overrides("data=2,fsdp=2,tensor=2"))
    setup = make_setup(cfg)
    state = init_state(setup)
    params = _flat(state["params"])
    assert set(params) == set(EXPECTED_SPECS)
    for name, leaf in params.items():
        assert _norm_spec(leaf.sharding.spec) == EXPECTED_SPECS[name], name
    mu = _flat(state["opt_state"][1][0].mu)
    nu = _flat(state["opt_state"][1][0].nu)
    for name, spec in EXPECTED_SPECS.items():
        assert _norm_spec(mu[name].sharding.spec) == spec, name
        assert _norm_spec(nu[name].sharding.spec) == spec, name


def _bytes_on_device0(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = next(s for s in leaf.addressable_shards if s.device == jax.devices()[0])
        total += shard.data.nbytes
    return total


@pytest.mark.parametrize("layout, factor", [("fsdp=8", 8), ("fsdp=4,tensor=2", 8),
                                            ("data=2,fsdp=2,tensor=2", 4), ("data=8", 1)])
def test_per_device_bytes_shrink_by_fsdp_times_tensor(tmp_path, layout, factor):
    cfg = tiny(tmp_path, *layout_overrides(layout))
    state = init_state(make_setup(cfg))
    whole = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    per_device = _bytes_on_device0(state["params"])
    assert per_device == pytest.approx(whole / factor, rel=0.02)


def test_rule_override_changes_placement_without_code(tmp_path):
    cfg = tiny(tmp_path, *layout_overrides("fsdp=4,tensor=2"), "mesh.rules.embed=[]",
               "mesh.rules.mlp=[fsdp,tensor]")
    state = init_state(make_setup(cfg))
    params = _flat(state["params"])
    up_spec = _norm_spec(params["layers/mlp/up_proj"].sharding.spec)
    assert up_spec == P(None, None, ("fsdp", "tensor"))
    assert _norm_spec(params["embed"].sharding.spec) == P("tensor")


def test_replicated_parameters_warn(tmp_path, capsys):
    cfg = tiny(tmp_path, *layout_overrides("fsdp=8"), "mesh.rules.embed=[]")
    make_setup(cfg)
    assert "of parameter bytes are replicated" in capsys.readouterr().err


def _grads(cfg, batch_np):
    setup = make_setup(cfg)
    state = init_state(setup)
    batch = to_global(batch_np, setup.mesh, setup.rules, cfg.train.global_batch_size)
    grads, aux = jax.jit(lambda p, b: gradients(setup, p, b))(state["params"], batch)
    return jax.device_get(grads), float(aux["loss"])


def test_gradient_accumulation_equals_full_batch(tmp_path):
    base = ["train.global_batch_size=8", *layout_overrides("data=2,fsdp=2,tensor=2")]
    cfg_full = tiny(tmp_path, *base)
    cfg_accum = tiny(tmp_path, *base, "train.microbatches=2")
    batch = next(SyntheticSource(cfg_full.model.vocab_size, cfg_full.data.seq_len, 8, 3, "train"))
    batch["weights"][1, 40:] = 0.0  # uneven token counts across microbatches
    full_grads, full_loss = _grads(cfg_full, batch)
    accum_grads, accum_loss = _grads(cfg_accum, batch)
    assert accum_loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(accum_grads), strict=True):
        scale = np.abs(a).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_overfits_one_batch(tmp_path):
    cfg = tiny(tmp_path, "optimizer.lr=1e-2", "optimizer.schedule=constant",
               "optimizer.warmup_steps=0", "optimizer.weight_decay=0",
               *layout_overrides("fsdp=4,tensor=2"))
    setup = make_setup(cfg)
    state = init_state(setup)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (8, cfg.data.seq_len + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((8, cfg.data.seq_len), np.float32),
             "positions": np.tile(np.arange(cfg.data.seq_len, dtype=np.int32), (8, 1)),
             "segment_ids": np.ones((8, cfg.data.seq_len), np.int32)}
    batch = to_global(local, setup.mesh, setup.rules, 8)
    step = make_train_step(setup)
    for _ in range(150):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1


def test_weight_decay_skips_norms_biases_and_embeddings():
    cfg = load_config(CONFIGS / "tiny.yaml", NEOX_OVERRIDES + ["optimizer.weight_decay=0.5",
                                                               "optimizer.lr=0.1",
                                                               "optimizer.schedule=constant",
                                                               "optimizer.warmup_steps=0"])
    from llama_jax.model import Transformer

    params = nnx.to_pure_dict(nnx.state(Transformer(cfg.model, nnx.Rngs(0))))
    params = jax.tree.map(lambda x: x + 1.0, params)  # no zero biases: decay would show
    tx = make_optimizer(cfg.optimizer, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    mask = _flat(decay_mask(params))
    flat_old, flat_new = _flat(params), _flat(new)
    skipped = {n for n, decays in mask.items() if not decays}
    assert skipped == {n for n in flat_old if n in ("embed", "pos_embed")
                       or n.endswith(("scale", "bias"))}
    assert {"embed", "final_norm/bias", "layers/attn/q_bias", "layers/mlp/up_bias"} <= skipped
    for name in flat_old:
        if name in skipped:
            np.testing.assert_array_equal(flat_new[name], flat_old[name], err_msg=name)
        else:
            np.testing.assert_allclose(flat_new[name], flat_old[name] * (1 - 0.1 * 0.5),
                                       rtol=1e-6, err_msg=name)


NEOX_OVERRIDES = ["model.norm=layernorm", "model.activation=gelu", "model.attention_bias=true",
                  "model.mlp_bias=true", "model.parallel_residual=true"]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
def test_schedules_match_their_formula(schedule):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"optimizer.schedule={schedule}",
                                             "optimizer.lr=1.0", "optimizer.warmup_steps=10",
                                             "optimizer.min_lr_ratio=0.1",
                                             "optimizer.decay_fraction=0.2"])
    total, peak, floor = 110, 1.0, 0.1
    fn = lr_schedule(cfg.optimizer, total)

    def expected(t):
        if t < 10:
            return peak * t / 10
        frac = (t - 10) / 100
        if schedule == "constant":
            return peak
        if schedule == "cosine":
            return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return peak + (floor - peak) * frac
        decay_start = total - 22  # 20% of 110 steps
        if t < decay_start:
            return peak
        return peak + (floor - peak) * (t - decay_start) / 22

    for t in [0, 5, 10, 11, 40, 60, 87, 88, 99, 110]:
        assert float(fn(t)) == pytest.approx(expected(t), abs=1e-6), t


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
    assert "loss became NaN/Inf at step 1" in result.stderr.strip().splitlines()[-1]


def test_sharding_rules_dedupe_mesh_axes():
    mesh = jax.make_mesh((2, 4, 1, 1), ("data", "fsdp", "sequence", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rules = load_config(None).mesh.rules
    # The activation's batch takes fsdp first; embed then finds it used and stays whole.
    spec = sharding.logical_to_spec(("batch", "length", "embed"), rules, mesh)
    assert spec == P(("data", "fsdp"))
    # A dimension the axis does not divide is replicated rather than padded.
    assert sharding.logical_to_spec(("vocab", "embed"), rules, mesh, (10, 6)) == P()


def test_profile_steps_write_a_trace(tmp_path):
    result = run_cli("train", "configs/tiny.yaml", f"run_dir={tmp_path}", "train.steps=6",
                     "train.profile_start=3", "train.profile_steps=2")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_cpu_compile_options_are_dropped_where_xla_does_not_know_them(tmp_path, monkeypatch):
    """The CPU options are probed, not assumed: with a name this XLA lacks (a newer or older
    jaxlib) the step compiles without them, and with them it computes the same step."""
    from llama_jax import train as train_module
    from llama_jax.bench import compiled_random_step

    setup = make_setup(tiny(tmp_path))
    assert train_module.compiler_options(setup.mesh) == train_module.CPU_COMPILER_OPTIONS
    state, batch, step, _ = compiled_random_step(setup)
    _, with_options = step(state, batch)

    monkeypatch.setitem(train_module.CPU_COMPILER_OPTIONS, "xla_cpu_no_such_option", True)
    train_module._options_accepted.cache_clear()
    try:
        assert train_module.compiler_options(setup.mesh) is None
        state, batch, step, _ = compiled_random_step(setup)
        _, without = step(state, batch)
    finally:
        train_module._options_accepted.cache_clear()
    np.testing.assert_array_equal(with_options["loss"], without["loss"])
