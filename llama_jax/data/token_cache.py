"""Tokenize once: every local text file's documents as token ids, in array_record shards.

`llama-jax prepare-data` writes, for each input file of a text source, a folder
`data.cache_dir/tokens/<tokenizer>/<file>/` holding `train.array_record` and
`validation.array_record` (one record per document: its int32 token ids, the split chosen
by the same hash of the text as the text path's) and, written last, `index.json`: a folder
with an index is finished. The folder's name is a digest of the file's bytes and the
settings that shape its records (text field, validation fraction, bad-record policy); the
tokenizer's folder a digest of the tokenizer and its BOS/EOS flags. So re-running skips
finished files, a changed file rebuilds only its own folder, and a changed tokenizer starts
a new tree.

Training reads these shards instead of text when every file of a source has its folder
(`data.token_cache`, on by default), and says which it does. A run keeps the way it began: its data
state records it, and a resume that would switch is refused in one line (the batches would
differ from the uninterrupted run's).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llama_jax.config import DataConfig
from llama_jax.data.corpus import BadRecords, read_documents
from llama_jax.data.tokenizer import Tokenizer

SPLITS = ("train", "validation")
BATCH_DOCUMENTS = 256  # documents per tokenizing task
INDEX = "index.json"


def file_digest(path: Path) -> str:
    """Every byte of a file (a folder: of all its files), read in 1 MiB pieces."""
    h = hashlib.sha1()
    for part in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if part.is_file():
            h.update(part.name.encode())
            with part.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def tokenizer_key(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.digest()}-{int(tokenizer.add_bos)}{int(tokenizer.add_eos)}"


def shard_dir(data: DataConfig, tokenizer: Tokenizer, path: Path, digest: str) -> Path:
    settings = f"{data.text_field}|{data.validation_fraction}|{data.skip_bad_records}"
    key = hashlib.sha1(f"{digest}|{settings}".encode()).hexdigest()[:16]
    return Path(data.cache_dir) / "tokens" / tokenizer_key(tokenizer) / f"{path.name}-{key}"


@dataclass
class CachedFile:
    path: Path  # the input file
    folder: Path  # its shards

    @property
    def done(self) -> bool:
        return (self.folder / INDEX).is_file()

    def index(self) -> dict[str, Any]:
        return json.loads((self.folder / INDEX).read_text())


def cached_files(data: DataConfig, tokenizer: Tokenizer, files: list[Path]) -> list[CachedFile]:
    return [CachedFile(f, shard_dir(data, tokenizer, f, file_digest(f))) for f in files]


# ---------------------------------------------------------------------------------------------
# Building


_worker_tokenizer: Tokenizer | None = None


def _start_worker(model: str, add_bos: bool, add_eos: bool) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model, add_bos, add_eos)


Batch = tuple[list[str], list[bool]]  # documents, and whether each is in validation
Encoded = tuple[list[bytes], list[bool], list[int]]  # token records, splits, UTF-8 bytes


def _encode(batch: Batch, tokenizer: Tokenizer | None = None) -> Encoded:
    """sentencepiece's batch encode, with BOS/EOS as `Tokenizer.encode` adds them."""
    tok = tokenizer or _worker_tokenizer
    assert tok is not None
    texts, held = batch
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id >= 0 else []
    eos = [tok.eos_id] if tok.add_eos and tok.eos_id >= 0 else []
    records = [np.asarray([*bos, *ids, *eos], np.int32).tobytes()
               for ids in tok.sp.EncodeAsIds(texts)]
    return records, held, [len(t.encode("utf-8")) for t in texts]


def _batches(path: Path, data: DataConfig) -> Iterator[Batch]:
    """Up to BATCH_DOCUMENTS documents at a time, with the split of each."""
    from llama_jax.data.tfds_text import in_validation

    texts: list[str] = []
    bad = BadRecords(skip=data.skip_bad_records)
    for text in read_documents(path, bad, data.text_field):
        texts.append(text)
        if len(texts) == BATCH_DOCUMENTS:
            yield texts, [in_validation(t, data.validation_fraction) for t in texts]
            texts = []
    if texts:
        yield texts, [in_validation(t, data.validation_fraction) for t in texts]


def build(data: DataConfig, tokenizer: Tokenizer, files: list[CachedFile],
          progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Tokenize the files whose folder is not finished, over `data.num_workers` processes
    (0: in this process); `progress(bytes)` hears of each batch's text bytes. Returns how
    many files were built and how many were already done."""
    from array_record.python.array_record_module import ArrayRecordWriter

    todo = [f for f in files if not f.done]
    pool = None
    if data.num_workers > 0 and todo:
        context = multiprocessing.get_context("spawn")  # never fork a process running JAX
        pool = context.Pool(data.num_workers, _start_worker,
                            (str(tokenizer.path), tokenizer.add_bos, tokenizer.add_eos))
    try:
        for item in todo:
            partial = item.folder.with_name(item.folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # a build cut short
            partial.mkdir(parents=True)
            writers = {s: ArrayRecordWriter(str(partial / f"{s}.array_record"), "group_size:1")
                       for s in SPLITS}
            counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
            batches = _batches(item.path, data)
            encoded = (pool.imap(_encode, batches) if pool is not None
                       else (_encode(b, tokenizer) for b in batches))
            for records, held, sizes in encoded:
                for record, is_validation, size in zip(records, held, sizes, strict=True):
                    split = "validation" if is_validation else "train"
                    writers[split].write(record)
                    c = counts[split]
                    c["documents"] += 1
                    c["tokens"] += len(record) // 4
                    c["bytes"] += size
                if progress is not None:
                    progress(sum(sizes))
            for w in writers.values():
                w.close()
            (partial / INDEX).write_text(json.dumps({"file": str(item.path), **counts}))
            shutil.rmtree(item.folder, ignore_errors=True)
            os.replace(partial, item.folder)
    finally:
        if pool is not None:
            pool.terminate()
    return {"built": len(todo), "done_before": len(files) - len(todo)}


# ---------------------------------------------------------------------------------------------
# Reading


class DecodeTokens(grain.transforms.Map):
    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return {"tokens": np.frombuffer(record, np.int32)}


def token_splits(files: list[CachedFile]) -> dict[str, grain.MapDataset]:
    """Each split's documents over the files' shards, in file order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    out = {}
    for split in SPLITS:
        shards = [str(f.folder / f"{split}.array_record") for f in files
                  if f.index()[split]["documents"]]
        out[split] = grain.MapDataset.source(ArrayRecordDataSource(shards)).map(DecodeTokens())
    return out


def token_stats(files: list[CachedFile]) -> dict[str, dict[str, float]]:
    """Exact token counts per split, and bytes per predicted token (a document of n tokens
    predicts n - 1)."""
    stats = {}
    for split in SPLITS:
        parts = [f.index()[split] for f in files]
        tokens = sum(p["tokens"] for p in parts)
        targets = tokens - sum(p["documents"] for p in parts)
        stats[split] = {"tokens": float(tokens),
                        "bytes_per_token": sum(p["bytes"] for p in parts) / max(targets, 1)}
    return stats
