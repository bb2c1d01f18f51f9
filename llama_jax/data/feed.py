"""The batches a run consumes: its data source (synthetic tokens or the Grain text pipeline),
assembled into global arrays on the mesh. What kind of rows a source yields is said here, once,
and the rest of the code asks (`source_kind`) rather than compare dataset names."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np

from llama_jax.config import Config
from llama_jax.data.batch import to_global
from llama_jax.data.sources import SourceKind, kind_of, kind_of_mixture

if TYPE_CHECKING:  # the data pipeline imports TFDS: only runs with real data pay for it
    from llama_jax.data.pipeline import PreparedData
    from llama_jax.step import Batch, Setup


def source_kind(cfg: Config) -> SourceKind:
    if cfg.data.sources:
        return kind_of_mixture([s.dataset for s in cfg.data.sources])
    kind = kind_of(cfg.data.dataset)
    if not kind.text and cfg.data.synthetic_document_tokens:  # synthetic documents, packed
        return dataclasses.replace(kind, packed=True)
    return kind


def make_source(cfg: Config, data: PreparedData | None, split: str, rows: int, seed: int,
                evaluation: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of `rows` rows per step from `split` ('train' or 'validation').
    For `evaluation` the documents come in order, every process's rows are cut from the same
    global batches (the same rows for any number of processes), and with several sources
    each batch also says each input's source."""
    if data is None:
        from llama_jax.data.synthetic import SyntheticSource

        return SyntheticSource(cfg.model.vocab_size, cfg.data.seq_len, rows, seed, split,
                               jax.process_index(), jax.process_count(),
                               cfg.data.synthetic_document_tokens)
    from llama_jax.data.pipeline import TextPipeline

    return TextPipeline(cfg, data, split, rows // jax.process_count(), seed,
                        shuffle=not evaluation, keep_source=evaluation and by_source(data),
                        shared=evaluation)


def prepare(cfg: Config) -> PreparedData | None:
    """The dataset and tokenizer of the config (None for synthetic tokens)."""
    if not source_kind(cfg).text:
        return None
    from llama_jax.data.pipeline import prepare_data

    return prepare_data(cfg)


def global_batches(setup: Setup, source: Iterator[dict[str, np.ndarray]], rows: int
                   ) -> Iterator[Batch]:
    for local in source:
        yield to_global(local, setup.mesh, setup.rules, rows)


def by_source(data: PreparedData | None) -> bool:
    """Whether evaluation reports each source's loss: a run with several sources."""
    return data is not None and len(data.sources) > 1


def eval_batches(setup: Setup, data: PreparedData | None, split: str = "validation",
                 count: int | None = None) -> list[Batch]:
    """The first `count` batches of a split, unshuffled: the same every time they are made
    (the sources mixed as in training, each input's source kept when there are several)."""
    cfg = setup.cfg
    rows = cfg.train.global_batch_size
    source = make_source(cfg, data, split, rows, cfg.train.seed, evaluation=True)
    it = global_batches(setup, source, rows)
    batches = [next(it) for _ in range(count or cfg.train.eval_batches)]
    getattr(source, "close", lambda: None)()
    return batches


def whole_split_batches(setup: Setup, data: PreparedData, split: str) -> Iterator[Batch]:
    """Every document of a split once (`pipeline.whole_split`), as global batches made as
    they are needed: a split larger than device memory streams through."""
    from llama_jax.data.pipeline import whole_split

    rows = setup.cfg.train.global_batch_size
    keep = by_source(data)
    for local in whole_split(setup.cfg, data, split, rows):
        if not keep:
            local = {key: value for key, value in local.items() if key != "source"}
        yield to_global(local, setup.mesh, setup.rules, rows)
