"""What the backward pass keeps of a model's forward (its saved residuals), per layer, for rows of
one document and for packed rows: the memory a remat policy or an attention path costs,
from tracing alone (abstract parameters; nothing is allocated or run, so a 1B model's
figures come from a laptop).

    python scripts/saved_residuals.py CONFIG [a.b=value ...] [--rows B]

With `model.attention=cudnn` JAX's cuDNN module asks the installed cuDNN and the GPU for
versions while tracing; here an H200 with cuDNN 9.10 answers (`gpu_target.answer_cudnn_checks`),
so the figures on CPU are those of the GPU program. Packed rows hold two documents each (the
figures do not depend on how many).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from llama_jax import sharding
from llama_jax.config import load_config
from llama_jax.errors import script_main
from llama_jax.gpu_target import answer_cudnn_checks
from llama_jax.model import Transformer


def residual_bytes(printed: str) -> int:
    """The total size of the residuals `print_saved_residuals` listed (`bf16[2,32,4,8] ...`:
    a dtype's short name carries its bits, `bool` is a byte)."""
    total = 0
    for line in printed.splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\]", line.strip())
        if match:
            dims = [int(d) for d in match.group(2).split(",") if d]
            bits = re.search(r"\d+", match.group(1))
            total += int(np.prod(dims)) * (int(bits[0]) // 8 if bits else 1)
    return total


def traced_bytes(m, rows: int, t: int, packed: bool) -> int:
    """The residuals of the model's loss for `rows` rows of `t` tokens."""
    tokens = jnp.zeros((rows, t), jnp.int32)
    positions = jnp.tile(jnp.arange(t, dtype=jnp.int32), (rows, 1))
    # packed: two documents a row (the layout's size does not depend on how many)
    segments = jnp.where(jnp.arange(t) < t // 2, 1, 2) * jnp.ones((rows, 1), jnp.int32)
    graph, state = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))))

    def loss(p):
        model = nnx.merge(graph, p)
        logits = model(tokens, positions, segments if packed else None)
        return jnp.sum(logits.astype(jnp.float32)[..., 0])

    printed = io.StringIO()
    with sharding.unsharded(), contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, nnx.to_pure_dict(state))
    return residual_bytes(printed.getvalue())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rows", type=int, default=0, help="batch rows (default: the config's "
                        "train.global_batch_size)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.attention == "cudnn":
        answer_cudnn_checks("h200")
    rows, t, layers = args.rows or cfg.train.global_batch_size, cfg.data.seq_len, \
        cfg.model.num_layers
    print(f"{args.config} {' '.join(args.overrides)}: {rows} rows x {t} tokens, {layers} layers")
    base = None
    for name, packed in (("one document per row", False), ("packed rows", True)):
        # one layer and two: their difference is one layer's (the embedding's and the head's
        # residuals, the same in both, drop out)
        one, two = (traced_bytes(dataclasses.replace(cfg.model, num_layers=n), rows, t, packed)
                    for n in (1, 2))
        layer = two - one
        base = layer if base is None else base
        added = layer - base
        print(f"{name:22} {layer / 2**20:10,.2f} MiB per layer ({added / 2**20:+.2f}), "
              f"{layer * layers / 2**30:.2f} GiB for {layers} ({added * layers / 2**30:+.2f})")
    return 0


if __name__ == "__main__":
    script_main("saved_residuals", lambda: main(sys.argv[1:]))
