"""A run's data as named sources mixed by token share (`data.sources`), and the tally of
what each source has fed the run.

Every run has at least one source: `data.sources` when set; otherwise each `data.paths` prefix
of a megatron run (weighted by `data.weights`, as NeoX blends), or `data.dataset` alone. Each
source keeps its own shuffle (a new order every epoch) and repeats on its own, so a small
source simply starts another epoch; the sources are then interleaved by Grain's `mix` with
per-document weights `weight / mean document length`, which makes every source's share of
*tokens* (not documents) its weight, as GPT-NeoX and Levanter blend. The interleaving is a
pure function of the index, so a saved iterator position restores the same mixture exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llama_jax.config import DataConfig
from llama_jax.data.file_shards import SPLITS
from llama_jax.data.sources import MEGATRON, kind_of

SEED_STRIDE = 7919  # source i shuffles with seed + 7919 i: independent orders per source


@dataclass
class Source:
    """One named source: its documents per split, random access."""

    name: str
    weight: float  # its share of the tokens (the weights of a run sum to 1)
    splits: dict[str, grain.MapDataset]
    text_key: str | None  # the text field; None: the documents are token ids ("tokens")
    cache_dir: Path | None = None  # where its tokenizer statistics are cached (text only)
    # split -> {"tokens": size in tokens (estimated for text), "bytes_per_token": or None}
    stats: dict[str, dict[str, float | None]] = field(default_factory=dict)
    skipped_records: int = 0  # bad records left out when it was built (data.skip_bad_records)
    settings: DataConfig | None = None  # its own data settings
    files: list[Path] = field(default_factory=list)  # the local files behind it, if any
    reads: str = "text"  # "text", or "tokens" (files tokenized once, or token files)

    def mean_document_tokens(self, split: str) -> float:
        return max(float(self.stats[split]["tokens"]) / max(len(self.splits[split]), 1), 1.0)


def source_settings(data: DataConfig) -> list[tuple[str, float, DataConfig]]:
    """(name, normalised weight, the source's own data settings) of every source."""
    if data.sources:
        named = [(s.name, s.weight, dataclasses.replace(
            data, dataset=s.dataset, files=s.files, paths=list(s.paths), weights=[],
            text_field=s.text_field or data.text_field,
            tfds_data_dir=s.tfds_data_dir or data.tfds_data_dir,
            train_split=s.train_split or data.train_split,
            eval_split=s.eval_split or data.eval_split, sources=[]))
                 for s in data.sources]
    elif data.dataset == MEGATRON:
        short = [Path(p).name for p in data.paths]
        names = short if len(set(short)) == len(short) else list(data.paths)
        weights = list(data.weights) or [1.0] * len(data.paths)
        named = [(name, w, dataclasses.replace(data, paths=[p], weights=[]))
                 for name, w, p in zip(names, weights, data.paths, strict=True)]
    else:
        named = [(data.dataset, 1.0, data)]
    total = sum(w for _, w, _ in named)
    return [(name, w / total, d) for name, w, d in named]


def load_source(name: str, weight: float, data: DataConfig) -> Source:
    """The source's splits (local text files become text shards once: text_shards.py)."""
    if kind_of(data.dataset).pretokenized:
        from llama_jax.data.megatron import prefix_splits

        parts = [prefix_splits(p, data.validation_fraction) for p in data.paths]
        splits = {split: _union([part[split] for part in parts]) for split in SPLITS}
        stats = {split: {"tokens": float(sum(part[split].tokens for part in parts)),
                         "bytes_per_token": None} for split in SPLITS}
        return Source(name, weight, splits, None, stats=stats, settings=data, reads="tokens")
    from llama_jax.data.tfds_text import load_dataset

    dataset = load_dataset(data)
    splits = {split: dataset.sources[split] if isinstance(dataset.sources[split],
                                                          grain.MapDataset)
              else grain.MapDataset.source(dataset.sources[split]) for split in SPLITS}
    return Source(name, weight, splits, dataset.text_key, dataset.cache_dir,
                  skipped_records=dataset.skipped_records, settings=data, files=dataset.files)


def _union(parts: list[Any]) -> grain.MapDataset:
    datasets = [grain.MapDataset.source(p) for p in parts]
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)


class TagSource(grain.transforms.Map):
    """Every token of a document carries its source's index, through packing into rows."""

    def __init__(self, index: int):
        self.index = index

    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = element["tokens"]
        return {"tokens": tokens, "source": np.full(tokens.shape, self.index, np.int32)}


def mixed_documents(sources: list[Source], split: str, seed: int, shuffle: bool,
                    process_index: int, process_count: int,
                    tokenize: Any = None) -> grain.MapDataset:
    """The endless document stream of one process: each source shuffled and repeated on its
    own, every `process_count`-th document of it taken (so processes never share a document,
    and each process mixes its own share of every source), tokenized (`tokenize(text_key)`
    gives the map, for text sources) and tagged; then the sources mixed by token share."""
    streams, rates = [], []
    for i, src in enumerate(sources):
        ds = src.splits[split]
        if shuffle:
            ds = ds.shuffle(seed=seed + SEED_STRIDE * i)
        ds = ds.repeat(None)[process_index::process_count]
        if src.text_key is not None:
            ds = ds.map(tokenize(src.text_key))
        streams.append(ds.map(TagSource(i)))
        rates.append(src.weight / src.mean_document_tokens(split))
    return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, rates)


class SourceTally:
    """Tokens each source has fed this process (input positions that hold a document).

    Saved with the data iterator as the run's total (summed over processes when saving), and
    restored on process 0 only, so the sum over processes stays the run's total on resume.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self.counts = np.zeros(len(names), np.int64)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        real = batch["segment_ids"] > 0
        self.counts += np.bincount(batch["source"][real], minlength=len(self.names))

    def total(self) -> dict[str, int]:
        """The run's tokens per source (a collective on multi-host runs: every process calls
        it at the same step)."""
        import jax

        counts = self.counts
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
        return {name: int(n) for name, n in zip(self.names, counts, strict=True)}

    def restore(self, saved: dict[str, int]) -> None:
        import jax

        self.counts[:] = 0
        if jax.process_index() == 0:
            self.counts[:] = [int(saved.get(name, 0)) for name in self.names]


def epochs(tokens: dict[str, int], sources: list[Source]) -> Iterator[tuple[str, float]]:
    """How many passes over its train split each source's tokens amount to."""
    for src in sources:
        yield src.name, tokens.get(src.name, 0) / max(float(src.stats["train"]["tokens"]), 1.0)
