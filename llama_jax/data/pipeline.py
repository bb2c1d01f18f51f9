"""The Grain input pipeline, and `prepare_data`, which builds what it needs once.

Per process: global shuffle by index (reshuffled every epoch) -> this process's slice
(`[process_index::process_count]`) -> tokenize -> concatenate documents and split into rows of
`seq_len + 1` tokens (long documents continue in the next row) -> model rows -> batch ->
background prefetch. Every step is a Grain dataset, so the iterator's state can be saved and
restored exactly.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import grain
import jax
import numpy as np
from etils import epath

from llama_jax.config import Config
from llama_jax.data.megatron import TokenDataset, token_dataset
from llama_jax.data.sources import kind_of
from llama_jax.data.tfds_text import Dataset, load_dataset
from llama_jax.data.tokenizer import Tokenizer, as_text, train_tokenizer
from llama_jax.errors import LlamaJaxError
from llama_jax.storage import as_path

STATS_DOCS = 2000


def model_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of seq_len+1 tokens -> inputs, targets and masks for seq_len positions.

    A target counts only when it continues the same document as its input, so no token is
    asked to predict the start of an unrelated document. Positions restart at every document
    boundary inside the row (a document continued from the previous row restarts at 0 too,
    which keeps positions below seq_len for learned position embeddings).
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
    }


class Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer_path: str, add_bos: bool, add_eos: bool, text_key: str):
        self.args = (tokenizer_path, add_bos, add_eos)
        self.text_key = text_key
        self._tok: Tokenizer | None = None

    def map(self, element: Any) -> dict[str, np.ndarray]:
        if self._tok is None:  # built lazily: workers and pickling carry only the path
            self._tok = Tokenizer(*self.args)
        return {"tokens": np.asarray(self._tok.encode(as_text(element[self.text_key])), np.int32)}


def documents(source: Any, seed: int, shuffle: bool, process_index: int,
              process_count: int) -> grain.MapDataset:
    """The endless document stream of one process: a global shuffle by index (a new order each
    epoch), then every `process_count`-th document, so processes never share a document and
    together cover each epoch."""
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None)[process_index::process_count]


class TextPipeline:
    """This process's batches of one split: an iterator with Grain's get_state/set_state."""

    def __init__(self, cfg: Config, data: PreparedData, split: str, rows_per_process: int,
                 seed: int, shuffle: bool = True, process_index: int | None = None,
                 process_count: int | None = None):
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if data.tokenizer is None:  # token ids on disk (megatron)
            ds = data.dataset.documents(split, seed, shuffle, pi, pc)
        else:
            ds = documents(data.dataset.sources[split], seed, shuffle, pi, pc)
            ds = ds.map(Tokenize(str(data.tokenizer.path), cfg.data.add_bos, cfg.data.add_eos,
                                 data.dataset.text_key))
        it = grain.experimental.ConcatThenSplitIterDataset(
            ds.to_iter_dataset(), length_struct={"tokens": cfg.data.seq_len + 1}
        )
        it = it.map(model_row).batch(rows_per_process, drop_remainder=True)
        if cfg.data.prefetch:
            it = grain.experimental.ThreadPrefetchIterDataset(
                it, prefetch_buffer_size=cfg.data.prefetch
            )
        self._iter = iter(it)

    def __iter__(self) -> TextPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def close(self) -> None:
        """Stop the prefetch thread now rather than at interpreter exit."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict[str, Any]:
        return self._iter.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state)


@dataclass
class PreparedData:
    dataset: Dataset | TokenDataset
    tokenizer: Tokenizer | None  # None: the data is token ids already (megatron)
    stats: dict[str, dict[str, float | None]]  # split -> bytes_per_token, tokens (estimated)

    @property
    def bytes_per_token(self) -> dict[str, float]:
        return {split: s["bytes_per_token"] for split, s in self.stats.items()}


def _resolve_tokenizer(cfg: Config, dataset: Dataset) -> os.PathLike:
    if cfg.data.tokenizer:
        path = as_path(cfg.data.tokenizer)
        if not path.is_file():
            raise LlamaJaxError(f"data.tokenizer: file not found: {path}")
        return path
    vocab = cfg.data.tokenizer_vocab_size or cfg.model.vocab_size
    path = dataset.cache_dir / f"tokenizer-bpe{vocab}.model"
    if not path.is_file():
        print(f"training a {vocab}-piece sentencepiece tokenizer on {dataset.name} ...",
              file=sys.stderr)
        train_tokenizer(dataset.sources["train"], dataset.text_key, vocab, path)
    return path


def _split_stats(dataset: Dataset, tokenizer: Tokenizer) -> dict[str, dict[str, float]]:
    """UTF-8 bytes per predicted token of each split, and its size in tokens (measured on up to
    STATS_DOCS documents, scaled to the split).

    A document of n tokens (BOS/EOS included) gives n - 1 targets; evaluation turns nats per
    token into bits per byte with this ratio.
    """
    flags = f"{int(tokenizer.add_bos)}{int(tokenizer.add_eos)}"
    path = dataset.cache_dir / f"stats2-{tokenizer.digest()}-{flags}.json"
    if path.is_file():
        return json.loads(path.read_text())
    stats = {}
    for split, source in dataset.sources.items():
        n_bytes = n_tokens = 0
        counted = min(len(source), STATS_DOCS)
        for i in range(counted):
            text = as_text(source[i][dataset.text_key])
            n_bytes += len(text.encode("utf-8"))
            n_tokens += max(len(tokenizer.encode(text)) - 1, 0)
        stats[split] = {"bytes_per_token": n_bytes / max(n_tokens, 1),
                        "tokens": n_tokens * len(source) / max(counted, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats))
    return stats


def prepare_data(cfg: Config) -> PreparedData:
    """Build (once, cached) the dataset and the tokenizer, and check the tokenizer fits."""
    if jax.process_index() == 0:
        data = _prepare(cfg)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llama_jax.prepare_data")
    if jax.process_index() != 0:
        data = _prepare(cfg)
    return data


def _prepare(cfg: Config) -> PreparedData:
    if kind_of(cfg.data.dataset).pretokenized:
        return _prepare_tokens(cfg)
    dataset = load_dataset(cfg.data)
    tokenizer = Tokenizer(_resolve_tokenizer(cfg, dataset), cfg.data.add_bos, cfg.data.add_eos)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise LlamaJaxError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    return PreparedData(dataset, tokenizer, _split_stats(dataset, tokenizer))


def _prepare_tokens(cfg: Config) -> PreparedData:
    """Token files: nothing to build; check the ids fit the model (from the largest id of a
    sample of documents: reading every token of a large corpus would take minutes)."""
    dataset = token_dataset(cfg.data.paths, cfg.data.weights, cfg.data.validation_fraction)
    for part in dataset.sources["train"]:
        sample = [part[i]["tokens"] for i in range(min(len(part), STATS_DOCS))]
        largest = max((int(t.max()) for t in sample if t.size), default=0)
        if largest >= cfg.model.vocab_size:
            raise LlamaJaxError(f"{part.data.prefix}: token id {largest} does not fit "
                                f"model.vocab_size={cfg.model.vocab_size}")
    stats = {split: {"bytes_per_token": None, "tokens": float(sum(p.tokens for p in parts))}
             for split, parts in dataset.sources.items()}
    return PreparedData(dataset, None, stats)


def copy_tokenizer(data: PreparedData, run_dir: epath.Path) -> None:
    """Runs carry their tokenizer, so evaluation and sampling need nothing else."""
    if jax.process_index() == 0 and data.tokenizer is not None:
        (run_dir / "tokenizer.model").write_bytes(data.tokenizer.path.read_bytes())
