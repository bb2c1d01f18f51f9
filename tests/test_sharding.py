"""Placement of parameters and optimizer state by the rules, and layout checks derived
from `mesh.rules`, not from fixed axis names."""

from __future__ import annotations

import jax
import pytest
from conftest import CONFIGS
from helpers import flat_tree, layout_overrides, tiny
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.config import load_config
from llama_jax.errors import ConfigError
from llama_jax.sharding import make_mesh
from llama_jax.step import init_state, make_setup


def test_heads_left_whole_by_the_rules_need_not_divide_by_tensor():
    """tensor=8 cannot split 4 heads, but with the rules keeping heads whole it does not try;
    the check follows the rules (it used to assume heads always go on `tensor`)."""
    base = ["mesh.tensor=8", "mesh.fsdp=1"]
    with pytest.raises(ConfigError, match="mesh.tensor=8 does not divide model.num_heads=4"):
        make_mesh(load_config(CONFIGS / "tiny.yaml", base))
    mesh = make_mesh(load_config(CONFIGS / "tiny.yaml", [*base, "mesh.rules.heads=[]",
                                                         "mesh.rules.kv_heads=[]"]))
    assert mesh.shape["tensor"] == 8


def test_heads_put_on_another_axis_are_checked_against_it():
    overrides = ["mesh.fsdp=8", "mesh.rules.batch=[data]", "mesh.rules.heads=[fsdp]"]
    with pytest.raises(ConfigError, match="mesh.fsdp=8 does not divide model.num_heads=4"):
        make_mesh(load_config(CONFIGS / "tiny.yaml", overrides))
    # With the batch on fsdp as usual, fsdp is taken before heads can have it: no split, no
    # refusal (the activations' heads stay whole).
    make_mesh(load_config(CONFIGS / "tiny.yaml", ["mesh.fsdp=8", "mesh.rules.heads=[fsdp]"]))


def test_the_batch_and_sequence_checks_follow_the_rules_too():
    with pytest.raises(ConfigError, match=r"mesh data x fsdp = 1 x 8 = 8 does not divide "
                                          r"train.global_batch_size=4"):
        make_mesh(load_config(CONFIGS / "tiny.yaml", ["mesh.fsdp=8",
                                                      "train.global_batch_size=4"]))
    # The batch kept whole: any global batch size goes.
    make_mesh(load_config(CONFIGS / "tiny.yaml", ["mesh.fsdp=8", "train.global_batch_size=4",
                                                  "mesh.rules.batch=[]"]))


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


def _norm_spec(spec):
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def test_parameter_and_optimizer_placement_follows_rules(tmp_path):
    cfg = tiny(tmp_path, *layout_overrides("data=2,fsdp=2,tensor=2"))
    setup = make_setup(cfg)
    state = init_state(setup)
    params = flat_tree(state["params"])
    assert set(params) == set(EXPECTED_SPECS)
    for name, leaf in params.items():
        assert _norm_spec(leaf.sharding.spec) == EXPECTED_SPECS[name], name
    mu = flat_tree(state["opt_state"][1][0].mu)
    nu = flat_tree(state["opt_state"][1][0].nu)
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
    params = flat_tree(state["params"])
    up_spec = _norm_spec(params["layers/mlp/up_proj"].sharding.spec)
    assert up_spec == P(None, None, ("fsdp", "tensor"))
    assert _norm_spec(params["embed"].sharding.spec) == P("tensor")


def test_replicated_parameters_warn(tmp_path, capsys):
    cfg = tiny(tmp_path, *layout_overrides("fsdp=8"), "mesh.rules.embed=[]")
    make_setup(cfg)
    assert "of parameter bytes are replicated" in capsys.readouterr().err


def test_sharding_rules_dedupe_mesh_axes():
    mesh = jax.make_mesh((2, 4, 1, 1), ("data", "fsdp", "sequence", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    rules = load_config(None).mesh.rules
    # The activation's batch takes fsdp first; embed then finds it used and stays whole.
    spec = sharding.logical_to_spec(("batch", "length", "embed"), rules, mesh)
    assert spec == P(("data", "fsdp"))
    # A dimension the axis does not divide is replicated rather than padded.
    assert sharding.logical_to_spec(("vocab", "embed"), rules, mesh, (10, 6)) == P()


def test_a_model_call_outside_activation_sharding_is_refused_not_silently_unsharded(tmp_path):
    """On 8 devices a constraint outside the context would do nothing: refused by name."""
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.errors import LlamaJaxError
    from llama_jax.model import Transformer

    cfg = tiny(tmp_path)
    model = Transformer(cfg.model, nnx.Rngs(0))
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(8, 8) % cfg.model.vocab_size
    with pytest.raises(LlamaJaxError, match="outside sharding.activation_sharding on 8 devices"):
        model(tokens)
    with sharding.unsharded():
        unsharded = model(tokens)
    setup = make_setup(cfg)
    with sharding.activation_sharding(setup.mesh, setup.rules):
        placed = jax.jit(lambda t: model(t))(tokens)
    # the batch over (data, fsdp) = 1 x 8, as the rules place it: one row per device
    assert {shard.data.shape[0] for shard in placed.addressable_shards} == {1}
    assert jnp.allclose(unsharded, placed, atol=1e-5)
