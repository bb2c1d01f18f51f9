"""A small Python API for notebooks and scripts.

    from llama_jax import api
    m = api.load("runs/default")            # a run, a checkpoint step, an HF LLaMA/NeoX folder
    logits = m.logits(tokens)               # numpy float32 [batch, length, vocab]
    texts = m.generate(["The"], max_new_tokens=20)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from llama_jax import sharding
from llama_jax.errors import LlamaJaxError
from llama_jax.evaluate import Loaded, load_for_inference
from llama_jax.generate import SamplingConfig, check_positions, check_token_ids, generate_ids
from llama_jax.storage import PathLike


class Model:
    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.cfg = loaded.cfg
        self.tokenizer = loaded.tokenizer
        setup = loaded.setup

        def forward(params: Any, tokens: jax.Array) -> jax.Array:
            with sharding.activation_sharding(setup.mesh, setup.rules):
                return nnx.merge(setup.graphdef, params)(tokens)

        self._forward = jax.jit(forward)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits [batch, length, vocab] for int tokens [batch, length]."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        check_token_ids(tokens, self.cfg.model.vocab_size)
        check_positions(tokens.shape[1], self.loaded.params)
        return np.asarray(self._forward(self.loaded.params, tokens), np.float32)

    def generate(self, prompts: list[str] | list[list[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 num_samples: int = 1) -> list[Any]:
        """Continuations of text prompts (returns text) or token-id prompts (returns ids)."""
        eos = self.tokenizer.eos_id if self.tokenizer is not None else -1
        sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, eos)  # checks them
        if num_samples < 1:
            raise LlamaJaxError(f"num_samples={num_samples} must be >= 1")
        as_text = bool(prompts) and isinstance(prompts[0], str)
        if as_text and self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        ids = [self.tokenizer.encode(p, eos=False) if as_text else list(p)
               for p in prompts]
        ids = [p for p in ids for _ in range(num_samples)]
        out = generate_ids(self.loaded.graphdef, self.loaded.params, ids, sampling,
                           seed=seed, mesh=self.loaded.mesh, rules=self.cfg.mesh.rules)
        if not as_text:
            return out
        return [self.tokenizer.decode([t for t in o if t != eos]) for o in out]


def load(path: PathLike, overrides: list[str] | tuple[str, ...] = (),
         step: int | None = None) -> Model:
    """Load a llama_jax run or checkpoint, or an HF LLaMA or GPT-NeoX folder (read in place);
    `overrides` may set a mesh (`mesh.tensor=2`, ...)."""
    return Model(load_for_inference(path, overrides, step))
