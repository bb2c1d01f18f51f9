"""A text source's documents: local files as per-file text shards (text_shards.py), or any
TFDS dataset already prepared as array_record (read without TensorFlow, random access for
Grain's global shuffle)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from llama_jax.config import DataConfig
from llama_jax.data.corpus import expand_files, write_python_docs
from llama_jax.data.sources import PYTHON_DOCS, TEXT_FILES
from llama_jax.data.text_shards import (
    build_text,
    skipped_records,
    text_settings,
    text_splits,
)
from llama_jax.errors import LlamaJaxError


@dataclasses.dataclass
class Dataset:
    """Random-access splits plus the identity used to cache tokenizers and statistics."""

    name: str
    sources: dict[str, Any]
    cache_dir: Path
    text_key: str = "text"
    skipped_records: int = 0  # bad records left out (data.skip_bad_records)
    files: list[Path] = dataclasses.field(default_factory=list)  # local files it was built from

    def __len__(self) -> int:
        return len(self.sources["train"])


def local_text_dataset(name: str, files: list[Path], data: DataConfig) -> Dataset:
    """Local files as per-file text shards (built where missing); the dataset's identity (for
    its tokenizer and statistics) digests every file and the settings."""
    items = build_text(name, data, files)
    identity = hashlib.sha1("|".join([text_settings(data),
                                      *(i.folder.name for i in items)]).encode())
    cache = Path(data.cache_dir) / f"{name}_{identity.hexdigest()[:12]}"
    return Dataset(cache.name, text_splits(items), cache, skipped_records=skipped_records(items),
                   files=files)


def registered_dataset(data: DataConfig) -> Dataset:
    """Any TFDS dataset already prepared (array_record) under `data.tfds_data_dir`. TFDS is
    imported here, not above: it costs every start 0.4 s, and local text never needs it."""
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS logs every custom config at WARNING
    tfds.disable_progress_bar()
    name = data.dataset
    try:
        sources = {split: tfds.data_source(name, split=s, data_dir=data.tfds_data_dir or None,
                                           download=False)
                   for split, s in (("train", data.train_split), ("validation", data.eval_split))}
    except tfds.core.registered.DatasetNotFoundError:
        raise LlamaJaxError(f"data.dataset: no TFDS dataset named '{name}'") from None
    except (FileNotFoundError, AssertionError, ValueError) as e:
        where = data.tfds_data_dir or "the default TFDS data_dir"
        raise LlamaJaxError(
            f"data.dataset: TFDS dataset '{name}' is not prepared in {where} as array_record "
            f"({str(e).splitlines()[0][:120]})"
        ) from None
    safe = name.replace("/", "_").replace(":", "_")
    return Dataset(safe, sources, Path(data.cache_dir) / safe, data.text_field)


def load_dataset(data: DataConfig) -> Dataset:
    if data.dataset == PYTHON_DOCS:
        corpus = write_python_docs(Path(data.cache_dir) / "corpus")
        return local_text_dataset(PYTHON_DOCS, [corpus], data)
    if data.dataset == TEXT_FILES:
        return local_text_dataset(TEXT_FILES, expand_files(data.files), data)
    return registered_dataset(data)
