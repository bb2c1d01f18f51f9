"""A learnable synthetic token stream for runs and tests that need no corpus.

Each row is an arithmetic progression modulo the vocabulary with a random start and stride,
so a model can learn it (loss falls quickly) and every batch is a pure function of
(seed, split, step, row): any process can produce exactly its own rows, and resuming needs
only the step counter. With `document_tokens` > 0 each row is packed instead: documents of
random lengths (geometric, that mean), each its own progression, laid end to end with
segment ids and positions as the text pipeline gives them; what packed rows cost (the
attention's document mask, cuDNN's packed layout) can so be measured without a corpus.
"""

from __future__ import annotations

import numpy as np

from llama_jax.data.batch import model_row, one_document_rows

SPLIT_SALT = {"train": 0, "validation": 1}


class SyntheticSource:
    def __init__(self, vocab_size: int, seq_len: int, global_rows: int, seed: int, split: str,
                 process_index: int = 0, process_count: int = 1, document_tokens: int = 0):
        if global_rows % process_count:
            raise ValueError(f"{global_rows} rows do not split over {process_count} processes")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.document_tokens = document_tokens
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
        self.step += 1
        if self.document_tokens:
            return self._packed(rng, mine)
        t = np.arange(self.seq_len + 1)
        tokens = (starts[:, None] + strides[:, None] * t[None, :]) % self.vocab_size
        return one_document_rows(tokens)

    def _packed(self, rng: np.random.Generator, mine: slice) -> dict[str, np.ndarray]:
        """Rows of documents; every row's lengths drawn for all rows, so a row does not
        depend on how many processes share the batch."""
        n = self.seq_len + 1
        # enough documents that even a row of short ones is full; the few left over unused
        most = n
        lengths = rng.geometric(1.0 / self.document_tokens, size=(self.global_rows, most))
        starts = rng.integers(0, self.vocab_size, size=(self.global_rows, most))
        strides = rng.integers(1, 8, size=(self.global_rows, most))
        rows = []
        for length, start, stride in zip(lengths[mine], starts[mine], strides[mine],
                                         strict=True):
            segment = np.repeat(np.arange(1, most + 1), length)[:n]
            first = np.concatenate([[0], np.cumsum(length)])[segment - 1]
            offset = np.arange(n) - first
            tokens = (start[segment - 1] + stride[segment - 1] * offset) % self.vocab_size
            rows.append(model_row({"tokens": tokens, "tokens_segment_ids": segment,
                                   "source": np.zeros(n, np.int32)}))
        return {key: np.stack([r[key] for r in rows]) for key in rows[0] if key != "source"}
