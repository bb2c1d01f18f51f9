"""TFDS as the dataset layer: our builder for local text files, and any registered dataset.

Local files become a TFDS dataset written as `array_record`, so reading needs no TensorFlow and
gives random access for Grain's global shuffle. A document goes to the validation split when a
hash of its text falls below `data.validation_fraction` (stable across runs and file order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from llama_jax.config import DataConfig
from llama_jax.data.corpus import BadRecords, expand_files, read_documents, write_python_docs
from llama_jax.data.sources import PYTHON_DOCS, TEXT_FILES
from llama_jax.errors import LlamaJaxError

SPLITS = ("train", "validation")
absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS logs every custom config at WARNING
tfds.disable_progress_bar()


def in_validation(text: str, fraction: float) -> bool:
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_field: str = "text"
    validation_fraction: float = 0.05
    skip_bad_records: bool = False


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local files of any format `corpus.read_documents` reads."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS: list[LocalTextConfig] = []

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            description="Local text files (llama_jax text_files builder).",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str) -> Any:
        cfg: LocalTextConfig = self.builder_config  # type: ignore[assignment]
        bad = BadRecords(skip=cfg.skip_bad_records)  # checked and counted before the build
        for path in map(Path, cfg.files):
            for i, text in enumerate(read_documents(path, bad, cfg.text_field)):
                if in_validation(text, cfg.validation_fraction) == (split == "validation"):
                    yield f"{path.name}:{i}", {"text": text}


def _content_id(files: list[Path], data: DataConfig) -> str:
    """A digest of the settings and every byte of the files (read in 1 MiB pieces: a corpus
    need not fit in memory); an arrow folder counts with all its files."""
    h = hashlib.sha1(f"{data.text_field}|{data.validation_fraction}|"
                     f"{data.skip_bad_records}".encode())
    for f in files:
        for part in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if part.is_file():
                h.update(str(part.resolve()).encode())
                with part.open("rb") as stream:
                    while chunk := stream.read(1 << 20):
                        h.update(chunk)
    return h.hexdigest()[:12]


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
    cache = Path(data.cache_dir)
    config = LocalTextConfig(name=f"{name}_{_content_id(files, data)}",
                             files=tuple(str(f) for f in files), text_field=data.text_field,
                             validation_fraction=data.validation_fraction,
                             skip_bad_records=data.skip_bad_records)
    builder = LocalText(config=config, data_dir=str(cache / "tfds"), file_format="array_record")
    skipped_file = cache / config.name / "skipped_records.json"
    if not builder.is_prepared():
        skipped = _check_splits(name, files, data)
        for file, count in skipped.items():
            print(f"warning: {file}: {count} bad record(s) skipped (data.skip_bad_records)",
                  file=sys.stderr)
        print(f"building TFDS dataset {config.name} from {len(files)} file(s) in {cache}/tfds",
              file=sys.stderr)
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS talks of downloading; we don't
            builder.download_and_prepare()
        skipped_file.parent.mkdir(parents=True, exist_ok=True)
        skipped_file.write_text(json.dumps(skipped))
    skipped = json.loads(skipped_file.read_text()) if skipped_file.is_file() else {}
    return Dataset(config.name, dict(builder.as_data_source()), cache / config.name,
                   skipped_records=sum(skipped.values()), files=files)


def _check_splits(name: str, files: list[Path], data: DataConfig) -> dict[str, int]:
    """Read every record once before TFDS writes anything: a bad record is refused in one
    line (or skipped and counted: the counts per file are returned), and a corpus that would
    leave a split empty is refused."""
    counts = {split: 0 for split in SPLITS}
    bad = BadRecords(skip=data.skip_bad_records)
    for path in files:
        for text in read_documents(path, bad, data.text_field):
            counts["validation" if in_validation(text, data.validation_fraction) else "train"] += 1
    if not any(counts.values()):
        shown = ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "")
        raise LlamaJaxError(f"data: the corpus ({shown}) has no text")
    for split, count in counts.items():
        if count == 0:
            raise LlamaJaxError(
                f"data: none of the {sum(counts.values())} documents of {name} fell in the "
                f"{split} split (data.validation_fraction={data.validation_fraction}); "
                f"change it or add documents"
            )
    return bad.skipped


def registered_dataset(data: DataConfig) -> Dataset:
    """Any TFDS dataset already prepared (array_record) under `data.tfds_data_dir`."""
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
