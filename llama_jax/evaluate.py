"""Loading a checkpoint for inference, and its loss / perplexity / bits per byte on a split."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoint import Checkpointer, CheckpointError, config_of, resolve
from llama_jax.config import Config, apply_overrides
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.train import (
    eval_batches,
    evaluate,
    make_eval_step,
    make_setup,
    prepare,
)


@dataclass
class Loaded:
    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: Any
    step: int
    tokenizer: Tokenizer | None
    setup: Any


def _with_run_tokenizer(cfg: Config, run_dir: Path) -> Config:
    """Prefer the tokenizer saved in the run directory over rebuilding one from the corpus."""
    saved = run_dir / "tokenizer.model"
    if saved.is_file() and cfg.data.dataset != "synthetic":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(saved)))
    return cfg


def load_for_inference(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                       step: int | None = None) -> Loaded:
    """Parameters only, restored straight into the shardings of the mesh the config (and the
    overrides) describe, whatever layout they were saved from."""
    where = resolve(path, step)
    cfg = _with_run_tokenizer(apply_overrides(config_of(path, step), overrides),
                              where.directory.parent)
    setup = make_setup(cfg)
    ckpt = Checkpointer(cfg, where.directory, read_only=True)
    steps = ckpt.steps()
    chosen = where.step if where.step is not None else (steps[-1] if steps else None)
    if chosen is None or chosen not in steps:
        raise CheckpointError(f"no complete checkpoint {'' if chosen is None else chosen} in "
                              f"{where.directory}")
    try:
        state, _, _ = ckpt.restore(chosen, setup.abstract_state, params_only=True)
    finally:
        ckpt.close()
    tokenizer = None
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        tokenizer = Tokenizer(cfg.data.tokenizer, cfg.data.add_bos, cfg.data.add_eos)
    return Loaded(cfg, setup.mesh, setup.graphdef, state["params"], chosen, tokenizer, setup)


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                        step: int | None = None, split: str = "validation",
                        batches: int = 0) -> dict[str, Any]:
    loaded = load_for_inference(path, overrides, step)
    data = prepare(loaded.cfg)
    rows = loaded.cfg.train.global_batch_size
    if not batches:
        if data is None:
            batches = loaded.cfg.train.eval_batches
        else:
            split_tokens = data.stats[split]["tokens"]
            batches = max(1, math.ceil(split_tokens / (rows * loaded.cfg.data.seq_len)))
    eval_step = make_eval_step(loaded.setup)
    result = evaluate(eval_step, loaded.params,
                      iter(eval_batches(loaded.setup, data, split, batches)),
                      data.bytes_per_token[split] if data else None)
    result.setdefault("bits_per_byte", None)  # synthetic tokens stand for no bytes: JSON null
    return {"step": loaded.step, "split": split, **result}
