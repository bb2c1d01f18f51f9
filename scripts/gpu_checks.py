"""GPU-only correctness checks for the fused attention path (run by hand on a lent GPU).

cuDNN attention cannot run on CPU, so CI never sees it. This compares its logits with the XLA
einsum path on the same parameters and checks causality: changing tokens after position t must
leave the logits before t unchanged. Exits 1 when one of these fails. Then packed rows
(cuDNN's packed layout, newer than the rest): logits as XLA's, and a document's tokens change
no logit of another document; their failure alone exits 3, so that gpu_bench.sh still times
one-document rows while saying packed rows are not to be trusted. On CPU,
`python scripts/gpu_checks.py dot_product_attention` runs the same checks on JAX's portable
kernel (how the test suite exercises this script).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import ops
from llama_jax.config import AttentionImpl, ModelConfig
from llama_jax.errors import LlamaJaxError, first_line, script_main
from llama_jax.model import Transformer

FUSED = tuple(a for a in typing.get_args(AttentionImpl) if a != "xla")  # the fused kernels


def main(fused: str = "cudnn") -> int:
    if fused not in FUSED:
        raise LlamaJaxError(f"attention {fused!r}: expected one of {', '.join(FUSED)}")
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, compute_dtype="bfloat16",
                      attention="xla")
    xla_model = Transformer(cfg, nnx.Rngs(0))
    params = nnx.state(xla_model)
    graph = nnx.split(Transformer(dataclasses.replace(cfg, attention=fused), nnx.Rngs(0)))[0]
    cudnn_model = nnx.merge(graph, params)
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, cfg.vocab_size)
    a, b = np.asarray(xla_model(tokens)), np.asarray(cudnn_model(tokens))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    print(f"{fused} vs xla logits (bf16): relative error {rel:.2e}")
    t = 100
    changed = tokens.at[:, t:].set((tokens[:, t:] + 7) % cfg.vocab_size)
    c = np.asarray(cudnn_model(changed))
    leak = float(np.abs(c[:, :t] - b[:, :t]).max())
    moved = float(np.abs(c[:, t:] - b[:, t:]).max())
    print(f"{fused} causality: max change before t={t}: {leak:.2e}; after: {moved:.2e}")
    ok = rel < 2e-2 and leak == 0.0 and moved > 0
    print("GPU CHECKS", "PASS" if ok else "FAIL")
    if not ok:
        return 1
    try:
        packed_ok = packed_rows(xla_model, cudnn_model, cfg.vocab_size, fused)
    except Exception as e:  # noqa: BLE001 - a new kernel path: report it, keep the rest
        print(f"{fused} packed rows: failed: {first_line(e)}")
        packed_ok = False
    print("PACKED ROWS CHECKS", "PASS" if packed_ok else
          "FAIL (packed rows with this attention are not to be trusted)")
    return 0 if packed_ok else 3


def three_documents(rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 256 tokens: documents of 70, 120 and 50 tokens, then 16 of padding (id 0);
    segment ids and positions restarting at each, as data/batch.py's `model_row` gives."""
    lengths = (70, 120, 50, 16)
    seg = np.repeat([1, 2, 3, 0], lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    return np.tile(seg, (rows, 1)), np.tile(pos, (rows, 1))


def packed_rows(xla_model: Transformer, fused_model: Transformer, vocab: int,
                fused: str) -> bool:
    """Rows of three documents (and a padding run), which cuDNN takes as its packed layout
    (model.max_segments_per_row): the logits match the XLA path's, and changing the middle
    document's tokens changes no logit of the documents before or after it."""
    seg, pos = three_documents()
    tokens = jax.random.randint(jax.random.key(2), (2, 256), 0, vocab)
    a, b = (np.asarray(m(tokens, pos, seg)) for m in (xla_model, fused_model))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    middle = (seg == 2)[0]
    changed = np.asarray(fused_model(jnp.where(middle, (tokens + 7) % vocab, tokens), pos, seg))
    outside = float(np.abs(changed[:, ~middle] - b[:, ~middle]).max())
    inside = float(np.abs(changed[:, middle] - b[:, middle]).max())
    print(f"{fused} packed rows vs xla logits (bf16): relative error {rel:.2e}; changing "
          f"document 2: max change outside it {outside:.2e}, inside {inside:.2e}")
    if fused == "cudnn" and ops.cudnn_takes_packed_rows():
        # its own process: offsets past K/V's end could fault and spoil this GPU context
        try:
            report = subprocess.run([sys.executable, __file__, GROUPED_KV_REPORT],
                                    timeout=60, capture_output=True, text=True)
            print(report.stdout.strip() if report.returncode == 0 else
                  f"cudnn packed layout, K/V of 2 heads: the report's process ended with "
                  f"{report.returncode}: {report.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            print("cudnn packed layout, grouped K/V report: no answer within 60 s")
    return rel < 2e-2 and outside == 0.0 and inside > 0


GROUPED_KV_REPORT = "--grouped-kv-report"


def grouped_kv_without_repeat(seg: jax.Array) -> None:
    """Said, not checked: cuDNN's packed layout with grouped K/V (fewer heads than the
    query) repeated to the query's heads and not. `ops.cudnn_packed_attention` repeats them
    where this JAX strides K/V's packed offsets by the query's heads (jax 0.10; not 0.11),
    so there the second line's error should be large, and elsewhere both small."""
    print("jax " + jax.__version__ + " strides packed K/V offsets by the query's heads: "
          + ("yes (K/V repeated)" if ops.packed_kv_offsets_follow_query_heads()
             else "no (K/V at their own heads)"))
    keys = jax.random.split(jax.random.key(3), 3)
    b, t = seg.shape
    q = jax.random.normal(keys[0], (b, t, 8, 64), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, t, 2, 64), jnp.bfloat16) for key in keys[1:])
    lengths, starts, _ = ops.segment_layout(seg, 16)
    want = np.asarray(ops.attention(q, k, v, seg, impl="xla", scale=0.125, block=0), np.float32)
    for repeat in (True, False):
        got = np.asarray(jax.jit(ops.cudnn_packed_attention, static_argnums=(5, 6))(
            q, k, v, lengths, starts, 0.125, repeat), np.float32)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        print(f"cudnn packed layout, K/V {'repeated to 8 heads' if repeat else 'of 2 heads'}: "
              f"relative error vs xla {rel:.2e}")


if __name__ == "__main__":
    if sys.argv[1:] == [GROUPED_KV_REPORT]:
        if not ops.cudnn_takes_packed_rows():
            sys.exit("cuDNN's packed layout does not run here (a Hopper or later GPU and "
                     "cuDNN 9.6+ needed)")
        grouped_kv_without_repeat(jnp.asarray(three_documents()[0]))
        sys.exit(0)
    script_main("gpu_checks", lambda: main(*sys.argv[1:]))  # gpu_bench.sh stops on 1,
    # goes on after 3
