"""The batch format every source yields, and its assembly into global sharded arrays.

A batch is a dict of [rows, seq_len] numpy arrays:
  inputs       int32 token ids fed to the model
  targets      int32 next-token ids
  weights      float32, 1 where the target counts in the loss (0: padding)
  positions    int32 position of each token within its own document (RoPE restarts per doc)
  segment_ids  int32 document index within the row, 0 for padding (attention never crosses)
  source       int32, evaluation batches of a mixture only: each input's source index
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.sharding import Rules, batch_sharding

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def model_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of seq_len+1 tokens -> inputs, targets and masks for seq_len positions.

    A target counts only when it continues the same document as its input, so no token is
    asked to predict the start of an unrelated document. Positions restart at every document
    boundary inside the row (a document continued from the previous row restarts at 0 too,
    which keeps positions below seq_len for learned position embeddings). `source` is each
    input's source index (mixture.py).
    """
    tokens = packed["tokens"].astype(np.int32)
    seg = packed["tokens_segment_ids"].astype(np.int32)
    seg_in, seg_out = seg[:-1], seg[1:]
    n = seg_in.shape[0]
    starts = np.concatenate([[True], seg_in[1:] != seg_in[:-1]])
    idx = np.arange(n, dtype=np.int32)
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "weights": ((seg_out == seg_in) & (seg_in > 0)).astype(np.float32),
        "positions": positions.astype(np.int32),
        "segment_ids": seg_in,
        "source": packed["source"][:-1].astype(np.int32),
    }


def one_document_rows(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of rows that each hold one sequence: `tokens` is [rows, seq_len + 1]."""
    rows, n = tokens.shape[0], tokens.shape[1] - 1
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "weights": np.ones((rows, n), np.float32),
            "positions": np.tile(np.arange(n, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, n), np.int32)}


def to_global(local: dict[str, np.ndarray], mesh: Mesh, rules: Rules,
              global_rows: int) -> dict[str, jax.Array]:
    """Assemble each process's rows into one global array sharded on the batch axes."""
    sharding = batch_sharding(mesh, rules)
    out = {}
    for key in (*BATCH_KEYS, "source"):
        if key not in local:
            continue
        value = local[key]
        out[key] = jax.make_array_from_process_local_data(
            sharding, value, (global_rows, *value.shape[1:])
        )
    if mesh.devices.flat[0].platform == "cpu":
        # XLA:CPU copies host data with the same thread pool that runs the computations; a
        # computation waiting in a collective on an unfinished copy can starve it (deadlock
        # seen with 8 simulated devices on 2 cores). Finish the copies first.
        jax.block_until_ready(out)
    return out
