"""Context parallelism (`mesh.sequence`): equal to the sequence held whole, balanced, and
refused in one line where it cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import grads_and_loss, layout_overrides, tiny

from llama_jax import context_parallel, ops
from llama_jax.errors import ConfigError
from llama_jax.step import make_setup
from llama_jax.train import train

KINDS = ["all_gather", "ring"]
WHOLE = layout_overrides("fsdp=8")
SPLIT = layout_overrides("fsdp=2,sequence=4")


def packed_batch(cfg, seed=0):
    """Rows of several documents: positions restart and segment ids change at each start."""
    rng = np.random.default_rng(seed)
    b, t = cfg.train.global_batch_size, cfg.data.seq_len
    starts = rng.random((b, t)) < 0.08
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    last_start = np.maximum.accumulate(np.where(starts, np.arange(t), 0), axis=1)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": (rng.random((b, t)) > 0.1).astype(np.float32),
            "positions": (np.arange(t) - last_start).astype(np.int32),
            "segment_ids": segment_ids}


@pytest.mark.parametrize("kind", KINDS)
def test_split_sequence_gradients_equal_the_whole_sequence(tmp_path, kind):
    """Packed documents, GQA (4 query / 2 kv heads), padding weights: loss and every gradient
    equal the sequence held whole on each device."""
    data = ["data.dataset=python_docs"]  # packed rows: segment ids reach attention
    whole = tiny(tmp_path, *data, *WHOLE)
    batch = packed_batch(whole)
    ref_grads, ref_loss = grads_and_loss(whole, batch)
    split = tiny(tmp_path, *data, *SPLIT, f"model.context_parallel={kind}")
    grads, loss = grads_and_loss(split, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    return root, _losses(root, "whole", WHOLE)


def _losses(root, name, layout):
    cfg = tiny(root / name, "data.dataset=python_docs", f"data.cache_dir={root / 'cache'}",
               "train.steps=10", "train.log_every=1", "checkpoint.every=0", *layout)
    return [row["loss"] for row in train(cfg, quiet=True).history]


@pytest.mark.parametrize("kind", KINDS)
def test_ten_steps_on_python_docs_equal_the_whole_sequence(whole_run, kind):
    root, reference = whole_run
    losses = _losses(root, kind, [*SPLIT, f"model.context_parallel={kind}"])
    assert len(losses) == 10
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("shards, t", [(2, 64), (4, 64), (4, 256), (8, 128)])
def test_every_device_has_the_same_causal_work(shards, t):
    order = context_parallel.balanced_order(t, shards)
    assert sorted(order) == list(range(t))
    for block in (t // (2 * shards), t // (4 * shards), 1):
        counts = context_parallel.unmasked_blocks(order, shards, block)
        assert max(counts) - min(counts) <= 1, (block, counts)
    plain = context_parallel.unmasked_blocks(np.arange(t), shards, t // (2 * shards))
    assert max(plain) > 2 * min(plain)  # what the balanced order fixes


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=36", *SPLIT], "data.seq_len=36 does not divide into 2 x 4 equal chunks"),
    (["model.attention=cudnn", *SPLIT], "model.attention=cudnn cannot attend across the "
                                        "sequence split 4 ways"),
    (["model.context_parallel=ulysses"], "model.context_parallel"),
])
def test_bad_context_parallel_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_setup(tiny(tmp_path, *overrides))


def test_offload_is_refused_on_cpu_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model.remat=offload_dots_with_no_batch_dims "
                                          "offloads activations to pinned host memory, which "
                                          "only GPU and TPU have"):
        make_setup(tiny(tmp_path, "model.remat=offload_dots_with_no_batch_dims"))


def test_block_skipping_never_skips_a_visible_pair():
    """`ops._may_see` decides from per-row extremes which block pairs the flash loops skip:
    on random packed and unpacked rows, in natural and shuffled order, it never skips a pair
    that holds a visible (same document, key not later) query-key pair, and it does skip."""
    rng = np.random.default_rng(0)
    skipped = 0
    for trial in range(400):
        t = 32
        starts = rng.random((2, t)) < 0.15
        starts[:, 0] = True
        seg = np.cumsum(starts, 1)
        pos = np.arange(t) - np.maximum.accumulate(np.where(starts, np.arange(t), 0), 1)
        order = rng.permutation(t) if trial % 3 == 0 else np.arange(t)
        qi = order[np.arange(8) + rng.integers(0, 25)]
        ki = order[np.sort(rng.choice(t, 8, replace=False)) if trial % 2 else
                   np.arange(8) + rng.integers(0, 25)]
        for packed in (True, False):
            q_seg, k_seg = (jnp.asarray(seg[:, qi]), jnp.asarray(seg[:, ki])) if packed else (
                None, None)
            q_pos = jnp.asarray(pos[:, qi] if packed else np.broadcast_to(qi, (2, 8)))
            k_pos = jnp.asarray(pos[:, ki] if packed else np.broadcast_to(ki, (2, 8)))
            may = bool(ops._may_see(q_pos, k_pos, q_seg, k_seg))
            assert may or not bool(jnp.any(ops.visible(q_pos, k_pos, q_seg, k_seg)))
            skipped += not may
    assert skipped > 20
