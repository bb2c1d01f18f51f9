"""Packed rows through cuDNN's packed layout (`ops.packed_fused_attention`), checked on CPU.

cuDNN cannot run here, so three things stand in for it: a reference of its packed-layout
contract (JAX's docstring: each row's sequences given by length and first token, -1 past the
last; attention causal within each sequence, nothing across), which our layout must turn
into exactly the document mask our own kernels apply; the model with that reference in
cuDNN's place, which must give the XLA path's logits and gradients, and fall back to the XLA
blocks for a batch whose rows hold too many documents; and the real call lowered for CUDA,
whose custom calls must carry the layout and run cuDNN's forward once per layer under the
remat policy that saves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from llama_jax import ops
from llama_jax.config import load_config
from llama_jax.model import Transformer

pytestmark = pytest.mark.usefixtures("unsharded")  # direct model calls


def reference_layout(seg: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Runs of equal ids by a plain loop over each row."""
    lengths = -np.ones((seg.shape[0], m), np.int32)
    starts = -np.ones((seg.shape[0], m + 1), np.int32)
    fits = True
    for b, row in enumerate(seg):
        runs: list[list[int]] = []
        for i, s in enumerate(row):
            if not runs or s != row[i - 1]:
                runs.append([i, 0])
            runs[-1][1] += 1
        fits &= len(runs) <= m
        for j, (start, length) in enumerate(runs[:m]):
            starts[b, j], lengths[b, j] = start, length
    return lengths, starts, fits


def packed_rows(rng: np.random.Generator, rows: int, t: int, docs: int,
                padding: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids 1..docs of random lengths, then `padding` tokens of id 0, and the
    positions that restart at every document (as data/pipeline.py's rows)."""
    seg = np.zeros((rows, t), np.int32)
    pos = np.zeros((rows, t), np.int32)
    for b in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, t - padding), docs - 1, replace=False))
        bounds = [0, *cuts, t - padding]
        for d in range(docs):
            seg[b, bounds[d]:bounds[d + 1]] = d + 1
            pos[b, bounds[d]:bounds[d + 1]] = np.arange(bounds[d + 1] - bounds[d])
        pos[b, t - padding:] = np.arange(padding)
    return seg, pos


def test_segment_layout_matches_a_loop_over_each_row():
    """Every run is a sequence (padding runs and an id that comes back after another count
    as runs of their own); rows with M and M+1 runs; one run; M = 2."""
    rng = np.random.default_rng(0)
    seg, _ = packed_rows(rng, 5, 40, 4, padding=6)
    seg[1] = 7  # one document
    seg[2, :] = np.repeat([1, 2, 1, 0, 3, 0], [5, 5, 5, 5, 5, 15])  # ids that come back
    seg[3] = np.repeat(np.arange(1, 9), 5)  # 8 runs
    for m in (2, 4, 5, 6, 8, 9):
        want = reference_layout(seg, m)
        got = jax.jit(ops.segment_layout, static_argnums=1)(jnp.asarray(seg), m)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"lengths, M={m}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"starts, M={m}")
        assert bool(got[2]) == want[2], m
    # the batch fits exactly when its fullest row holds at most M runs (row 3: 8 runs)
    assert bool(ops.segment_layout(jnp.asarray(seg), 8)[2])
    assert not bool(ops.segment_layout(jnp.asarray(seg), 7)[2])


def cudnn_contract(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                   starts: jax.Array, scale: float) -> jax.Array:
    """What cuDNN's packed layout computes, written from its contract alone: token i belongs
    to the sequence j with starts[j] <= i < starts[j] + lengths[j] (none: its output is left
    unwritten, zero here), and attends to the tokens of its own sequence up to itself. Dense
    float32 softmax, K/V repeated for grouped queries."""
    t = q.shape[1]
    i = jnp.arange(t)
    inside = ((starts[:, :-1, None] <= i) & (i < starts[:, :-1, None] + lengths[:, :, None])
              & (lengths[:, :, None] > 0))  # [B, M, T]
    seq = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)  # [B, T]
    mask = ((seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
            & (i[None, None, :] <= i[None, :, None]))
    groups = q.shape[2] // k.shape[2]
    k32, v32 = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (k, v))
    scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k32) * scale
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", jnp.nan_to_num(probs), v32)
    return jnp.where((seq >= 0)[:, :, None, None], out, 0.0).astype(q.dtype)


@pytest.fixture
def cudnn_as_its_contract(monkeypatch):
    monkeypatch.setattr(ops, "cudnn_packed_attention", cudnn_contract)
    monkeypatch.setattr(ops, "cudnn_takes_packed_rows", lambda: True)


def test_the_layout_gives_cudnn_the_document_mask():
    """Our layout fed to the contract = our blocked and one-einsum kernels on the same packed
    rows (padding included), values and gradients; and with too few sequences (M below a
    row's documents) the contract leaves tokens out, which is why such a batch falls back."""
    rng = np.random.default_rng(1)
    b, t, n, kv, h = 3, 48, 4, 2, 8
    seg, pos = packed_rows(rng, b, t, 5, padding=5)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(key, (b, t, kv, h)) for key in keys[1:])
    scale = h ** -0.5

    def contract(q, k, v):
        return cudnn_contract(q, k, v, *ops.segment_layout(seg, 6)[:2], scale)

    def ours(block):
        return lambda q, k, v: ops.attention(q, k, v, seg, impl="xla", scale=scale, block=block)

    probe = jax.random.normal(jax.random.key(5), (b, t, n, h))
    for block in (0, 16):
        want, want_vjp = jax.vjp(ours(block), q, k, v)
        got, got_vjp = jax.vjp(contract, q, k, v)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, c in zip(got_vjp(probe), want_vjp(probe), strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    short = cudnn_contract(q, k, v, *ops.segment_layout(seg, 4)[:2], scale)
    assert not np.allclose(short, ours(0)(q, k, v), atol=1e-3)


def packed_model_case(tiny_overrides, docs_per_row):
    cfg = load_config("configs/tiny.yaml", [*tiny_overrides, "data.seq_len=32",
                                            "model.max_segments_per_row=4",
                                            "model.compute_dtype=float32"]).model
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))
    rng = np.random.default_rng(docs_per_row)
    seg, pos = packed_rows(rng, 2, 32, 3, padding=4)
    seg[1], pos[1] = (x[0] for x in packed_rows(rng, 1, 32, docs_per_row))
    x = jax.random.randint(jax.random.key(3), (2, 32), 0, cfg.vocab_size)
    return cfg, params, x, jnp.asarray(pos), jnp.asarray(seg)


def model_loss_and_grads(cfg, params, x, pos, seg):
    def loss(p):
        model = nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(0)))[0], p)
        logits = model(x, pos, seg)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("docs", [4, 6], ids=["rows-fit", "a-row-over-the-bound"])
@pytest.mark.usefixtures("cudnn_as_its_contract")
def test_cudnn_on_packed_rows_gives_the_xla_model(tiny_overrides, monkeypatch, docs):
    """The model with `attention=cudnn` (cuDNN played by its contract) = `attention=xla` on
    packed rows, logits and every gradient, under remat with layers scanned: a batch whose
    rows fit `model.max_segments_per_row` (4 runs: 3 documents + padding; 4 documents) runs
    the fused branch, one with a 6-document row the blocks. Forcing the fused branch on that
    batch gives other logits, so the equality shows the fallback was taken."""
    cfg, params, x, pos, seg = packed_model_case(tiny_overrides, docs)
    cfg = dataclasses.replace(cfg, remat="projections_and_attention")
    fused = dataclasses.replace(cfg, attention="cudnn")
    (_, want), want_grads = model_loss_and_grads(cfg, params, x, pos, seg)
    (_, got), got_grads = model_loss_and_grads(fused, params, x, pos, seg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    fits = bool(ops.segment_layout(seg, cfg.max_segments_per_row)[2])
    assert fits == (docs == 4)
    if not fits:
        layout = ops.segment_layout
        monkeypatch.setattr(ops, "segment_layout",
                            lambda s, m: (*layout(s, m)[:2], jnp.array(True)))
        (_, forced), _ = model_loss_and_grads(fused, params, x, pos, seg)
        np.testing.assert_allclose(forced[0], want[0], rtol=1e-5, atol=1e-5)  # row 0 fits
        assert not np.allclose(forced[1], want[1], atol=1e-3)


def cuda_custom_calls(text: str) -> list[tuple[str, str]]:
    """(target, backend config) of each cuDNN attention call in a lowered module."""
    return re.findall(r'custom_call @(__cudnn\$fmha\w*)\((?:[^)]*)\)\s*\{[^}]*?backend_config = '
                      r'"((?:[^"\\]|\\.)*)"', text)


@pytest.fixture
def cuda_lowering(monkeypatch):
    """JAX's cuDNN module asks the installed cuDNN and the GPU for versions while tracing;
    on CPU, answer as a Hopper GPU with cuDNN 9.10 would, so the call can be lowered for
    CUDA (never compiled or run here)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


@pytest.mark.usefixtures("cuda_lowering")
@pytest.mark.parametrize("packed,kv_offsets_by_query_heads",
                         [(True, True), (True, False), (False, True)],
                         ids=["packed-jax0.10-strides", "packed-jax0.11-strides",
                              "one-document-rows"])
def test_the_cudnn_call_lowers_for_cuda_with_the_layout_once_per_layer(
        tiny_overrides, monkeypatch, packed, kv_offsets_by_query_heads):
    """The model's loss gradient lowered for CUDA (the real JAX entry point, not a stand-in):
    packed rows reach cuDNN's forward and backward as int32 [B, M] lengths and [B, M+1]
    starts with `PADDING_CAUSAL` and M segments per row, K/V repeated to the query's heads
    only where JAX strides K/V's packed offsets by the query's heads, and under
    `remat=projections_and_attention` with scanned layers each runs once per layer (the
    forward's output and stats are saved through the `lax.cond`, not computed again for the
    backward); one-document rows keep the plain causal call."""
    monkeypatch.setattr(ops, "packed_kv_offsets_follow_query_heads",
                        lambda: kv_offsets_by_query_heads)
    cfg, params, x, pos, seg = packed_model_case(tiny_overrides, 4)
    cfg = dataclasses.replace(cfg, attention="cudnn", compute_dtype="bfloat16",
                              remat="projections_and_attention")
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))

    def loss(p):
        model = nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(0)))[0], p)
        logits = model(x, pos, seg if packed else None)
        return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
    calls = cuda_custom_calls(text)
    names = sorted(name for name, _ in calls)
    assert names == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], names
    m = cfg.max_segments_per_row
    for _, config in calls:
        config = config.replace('\\22', '"')
        mask = re.search(r'"mask_type": "(\w+)"', config).group(1)
        segments = int(re.search(r'"max_seg_per_batch": (\d+)', config).group(1))
        assert (mask, segments) == (("PADDING_CAUSAL", m) if packed else ("CAUSAL", 1))
    layout_operands = re.findall(rf"tensor<2x{m}xi32>, tensor<2x{m}xi32>, "
                                 rf"tensor<2x{m + 1}xi32>, tensor<2x{m + 1}xi32>", text)
    assert len(layout_operands) == (2 if packed else 0)
    # Q, K, V of the forward call: packed under jax 0.10's strides, K/V repeated to the
    # query's heads (its packed offsets take one token stride for all three)
    n, kv, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    assert kv < n
    heads = n if packed and kv_offsets_by_query_heads else kv
    assert re.search(rf"@__cudnn\$fmhaSoftmax\(.* : \(tensor<2x32x{n}x{h}xbf16>, "
                     rf"tensor<2x32x{heads}x{h}xbf16>, tensor<2x32x{heads}x{h}xbf16>", text)


@pytest.fixture
def fresh_stride_answer():
    ops.packed_kv_offsets_follow_query_heads.cache_clear()
    yield
    ops.packed_kv_offsets_follow_query_heads.cache_clear()


@pytest.mark.usefixtures("fresh_stride_answer")
def test_the_kv_stride_answer_is_this_jaxs_own():
    """`packed_kv_offsets_follow_query_heads` agrees with the installed JAX's offsets on a
    grouped case of other shapes than its own (8 query heads, 2 K/V heads of 64, three
    documents in each of two rows): the second row's second document starts at 256 + 70
    tokens, times the query's heads x 64 elements where the answer is yes, else K/V's."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    lengths = jnp.array([[70, 120, 66], [70, 120, 66]], jnp.int32)
    starts = jnp.array([[0, 70, 190, -1], [0, 70, 190, -1]], jnp.int32)
    *_, kv_offsets = fa._fix_seqlen_offsets(lengths, lengths, starts, starts,
                                            jnp.zeros((2, 256, 8, 64)), jnp.zeros((2, 256, 2, 64)))
    heads = 8 if ops.packed_kv_offsets_follow_query_heads() else 2
    assert int(kv_offsets[1, 0]) == (256 + 70) * heads * 64, kv_offsets


@pytest.mark.usefixtures("fresh_stride_answer")
@pytest.mark.parametrize("stride", ["query-heads", "kv-heads", "gone"])
def test_the_kv_stride_answer_follows_the_offset_function(monkeypatch, stride):
    """Strides by the query's heads (jax 0.10): repeat; by K/V's own (jax 0.11): no repeat;
    no such function (a later JAX): repeat, which is right under either."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    def offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
        kv_heads = query.shape[2] if stride == "query-heads" else key.shape[2]
        return (q_seqlen, kv_seqlen, q_offsets * query.shape[2] * query.shape[3],
                kv_offsets * kv_heads * key.shape[3])

    if stride == "gone":
        monkeypatch.delattr(fa, "_fix_seqlen_offsets")
    else:
        monkeypatch.setattr(fa, "_fix_seqlen_offsets", offsets)
    answer = jax.jit(lambda: jnp.asarray(ops.packed_kv_offsets_follow_query_heads()))()
    assert bool(answer) == (stride != "kv-heads")


def test_synthetic_documents_are_packed_rows_as_text_gives_them():
    """`data.synthetic_document_tokens`: several documents a row, positions restarting and
    no target across a boundary (data/batch.py's `model_row`), documents of about that mean
    length, and each process's rows the same as in a one-process batch."""
    from llama_jax.data.synthetic import SyntheticSource

    whole = next(SyntheticSource(97, 256, 8, 3, "train", document_tokens=20))
    seg, pos, w = whole["segment_ids"], whole["positions"], whole["weights"]
    runs = np.asarray(ops.segment_runs(jnp.asarray(seg)))
    first = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (seg > 0).all() and (np.diff(seg, axis=1) >= 0).all()
    np.testing.assert_array_equal(pos == 0, first)
    np.testing.assert_array_equal(w[:, :-1] == 0, first[:, 1:])  # no target across
    # tokens per document ~20 (a little less: the documents cut at a row's ends count too)
    assert 14 <= seg.size / (runs[:, -1] + 1).sum() <= 26, runs[:, -1]
    halves = [next(SyntheticSource(97, 256, 8, 3, "train", i, 2, document_tokens=20))
              for i in range(2)]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)


@pytest.mark.usefixtures("cudnn_as_its_contract")
def test_training_on_packed_rows_with_cudnn_equals_xla_and_says_when_rows_overflow(
        tmp_path, capsys):
    """Sharded training (fsdp x data) on synthetic documents: `attention=cudnn` (its
    contract in cuDNN's place) gives the losses of `attention=xla`; every logged row says the
    most documents a row held; a bound below that is said once on stderr and still trains
    the same (those steps took the blocks)."""
    from helpers import tiny

    from llama_jax.data.synthetic import SyntheticSource
    from llama_jax.train import train

    # Layers unrolled: XLA:CPU can deadlock when a scan's FSDP all-gather and a top-level
    # collective meet on one device (docs/design.md); this ran into it once under a loaded
    # suite (a worker aborted after the 600 s rendezvous limit). Attention is what is tested.
    base = ["train.steps=4", "train.log_every=2", "data.synthetic_document_tokens=12",
            "mesh.data=2", "mesh.fsdp=4", "model.scan_layers=false"]
    losses, rows = {}, {}
    for name, extra in {"xla": [], "cudnn": ["model.attention=cudnn"],
                        "cudnn-bound-2": ["model.attention=cudnn",
                                          "model.max_segments_per_row=2"]}.items():
        result = train(tiny(tmp_path / name, *base, *extra), quiet=True)
        losses[name] = [r["loss"] for r in result.history]
        rows[name] = result.history
        if name != "cudnn-bound-2":
            assert "max_segments_per_row" not in capsys.readouterr().err
    note = capsys.readouterr().err
    assert note.count("more than model.max_segments_per_row=2") == 1, note
    for name in ("cudnn", "cudnn-bound-2"):
        np.testing.assert_allclose(losses[name], losses["xla"], rtol=2e-5, err_msg=name)
    cfg = tiny(tmp_path / "x", *base)
    source = SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.global_batch_size,
                             cfg.train.seed, "train", document_tokens=12)
    most = [int(np.asarray(ops.segment_runs(jnp.asarray(next(source)["segment_ids"])))[:, -1]
                .max()) + 1 for _ in range(4)]
    assert [r["documents_per_row"] for r in rows["xla"]] == [max(most[:2]), max(most[2:])]


@pytest.mark.usefixtures("cuda_lowering")
def test_the_fallback_adds_no_residuals_to_the_fused_path(tiny_overrides):
    """What the backward keeps from the cond (the union of its branches'): cuDNN's output
    [B, T, N, H] and stats [B x M, N, T] per layer, nothing of the blocks (their output and
    log-sum-exp would be kept on every step for a branch that rarely runs)."""
    cfg, params, x, pos, seg = packed_model_case(tiny_overrides, 4)
    cfg = dataclasses.replace(cfg, attention="cudnn", compute_dtype="bfloat16",
                              remat="projections_and_attention", scan_layers=False)
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(0))))

    def loss(p):
        model = nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(0)))[0], p)
        return jnp.sum(model(x, pos, seg).astype(jnp.float32)[..., 0])

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # JAX's public form of the list: printed
        print_saved_residuals(loss, params)
    from_cond = sorted(line.split()[0] for line in printed.getvalue().splitlines()
                       if "packed_fused_attention" in line)
    b, t, n, h, m = 2, 32, cfg.num_heads, cfg.head_size, cfg.max_segments_per_row
    assert from_cond == sorted([f"bf16[{b},{t},{n},{h}]", f"f32[{b * m},{n},{t}]"]
                               * cfg.num_layers), printed.getvalue()


def test_gpu_checks_grouped_kv_report_runs(monkeypatch, capsys):
    """scripts/gpu_checks.py's report on grouped K/V without the repeat (GPU only, since it
    calls cuDNN directly) runs here with cuDNN's contract in its place: both lines printed,
    and both match the XLA path, as the contract repeats K/V itself; the first line says
    this JAX's K/V stride as `ops` decides it."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "scripts/gpu_checks.py")
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    monkeypatch.setattr(ops, "cudnn_packed_attention",
                        lambda q, k, v, lengths, starts, scale, repeat_kv=None:
                        cudnn_contract(q, k, v, lengths, starts, scale))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], [100, 60, 80, 16], axis=1).repeat(2, axis=0))
    gpu_checks.grouped_kv_without_repeat(seg)
    out = capsys.readouterr().out
    errors = re.findall(r"relative error vs xla ([\d.e+-]+)", out)
    assert len(errors) == 2 and all(float(e) < 1e-2 for e in errors), errors
    stride = re.search(r"strides packed K/V offsets by the query's heads: (yes|no)", out)
    assert stride and (stride[1] == "yes") == ops.packed_kv_offsets_follow_query_heads(), out


def test_without_cudnns_packed_layout_packed_rows_take_the_blocks(tiny_overrides, capsys):
    """Where cuDNN cannot take packed rows (here: no cuDNN at all; on a GPU: before Hopper
    or cuDNN 9.6), `attention=cudnn` attends them with the xla blocks, as before the layout
    was used, and says so once."""
    assert not ops.cudnn_takes_packed_rows()
    ops._say_packed_rows_take_the_blocks.cache_clear()
    cfg, params, x, pos, seg = packed_model_case(tiny_overrides, 4)
    (_, want), _ = model_loss_and_grads(cfg, params, x, pos, seg)
    fused = dataclasses.replace(cfg, attention="cudnn")
    (_, got), _ = model_loss_and_grads(fused, params, x, pos, seg)
    (_, again), _ = model_loss_and_grads(dataclasses.replace(fused, remat="full"), params, x,
                                         pos, seg)
    np.testing.assert_array_equal(got, want)
    assert capsys.readouterr().err.count("packed rows take the xla attention blocks") == 1
