"""A learnable synthetic token stream for runs and tests that need no corpus.

Each row is an arithmetic progression modulo the vocabulary with a random start and stride,
so a model can learn it (loss falls quickly) and every batch is a pure function of
(seed, split, step, row): any process can produce exactly its own rows, and resuming needs
only the step counter.
"""

from __future__ import annotations

import numpy as np

from llama_jax.data.batch import one_document_rows

SPLIT_SALT = {"train": 0, "validation": 1}


class SyntheticSource:
    def __init__(self, vocab_size: int, seq_len: int, global_rows: int, seed: int, split: str,
                 process_index: int = 0, process_count: int = 1):
        if global_rows % process_count:
            raise ValueError(f"{global_rows} rows do not split over {process_count} processes")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.salt = SPLIT_SALT[split]
        self.global_rows = global_rows
        per_process = global_rows // process_count
        self.rows = range(process_index * per_process, (process_index + 1) * per_process)
        self.step = 0

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def __iter__(self) -> SyntheticSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.salt, self.step])
        mine = slice(self.rows.start, self.rows.stop)
        starts = rng.integers(0, self.vocab_size, size=self.global_rows)[mine]
        strides = rng.integers(1, 8, size=self.global_rows)[mine]
        t = np.arange(self.seq_len + 1)
        tokens = (starts[:, None] + strides[:, None] * t[None, :]) % self.vocab_size
        self.step += 1
        return one_document_rows(tokens)
