"""Local files as array_record shards, one folder per input file: the documents' text, or
their token ids (token_cache.py).

A folder holds `train.array_record` and `validation.array_record` (one record per document,
the split chosen by a hash of the text) and, written last, `index.json` (documents, tokens
and text bytes per split, bad records skipped): a folder with an index is finished. It is
written as `NAME.partial` and renamed at the end, so a build cut short leaves nothing that
looks finished. Its name is a digest of the file's bytes and of the settings that shape its
records, so a changed file rebuilds only its own folder.

Why not TFDS's builder, which this replaced for local files: it keeps up to 1 GB of
examples in memory and then spills them through TensorFlow's file API, so a corpus over
1 GB failed to build without TensorFlow installed, and its dataset-wide digest rebuilt every
shard when one file changed. Here a file is streamed from reader to writer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain

from llama_jax.errors import LlamaJaxError, first_line
from llama_jax.storage import named

SPLITS = ("train", "validation")
INDEX = "index.json"
# A document: (split, record bytes, tokens in it (0 for text), its text's UTF-8 bytes)
Record = tuple[str, bytes, int, int]


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    p = Path(path)
    h = hashlib.sha1()
    for part in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if part.is_file():
            h.update(part.name.encode())
            with part.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """Every byte of a file (a folder: of all its files), read in 1 MiB pieces; computed once
    per process for a given size and modification time."""
    stats = [path.stat()] + ([p.stat() for p in path.rglob("*")] if path.is_dir() else [])
    return _digest(str(path.resolve()), sum(s.st_size for s in stats),
                   max(s.st_mtime_ns for s in stats))


@dataclass
class FileShards:
    """One input file's shards."""

    path: Path  # the input file
    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / INDEX).is_file()

    def index(self) -> dict[str, Any]:
        return json.loads((self.folder / INDEX).read_text())

    def shard(self, split: str) -> str:
        return str(self.folder / f"{split}.array_record")


def shards_for(root: Path, files: list[Path], settings: str) -> list[FileShards]:
    """Each file's folder under `root`: its name, and a digest of its bytes and `settings`."""
    out = []
    for f in files:
        key = hashlib.sha1(f"{file_digest(f)}|{settings}".encode()).hexdigest()[:16]
        out.append(FileShards(f, root / f"{f.name}-{key}"))
    return out


def write(item: FileShards, records: Iterable[Record],
          extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write a file's records into its folder (replacing an unfinished one), and an index
    with `extra()`'s entries (asked once the records are written); returns the index."""
    from array_record.python.array_record_module import ArrayRecordWriter

    partial = item.folder.with_name(item.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a build cut short
    partial.mkdir(parents=True)
    writers = {s: ArrayRecordWriter(str(partial / f"{s}.array_record"), "group_size:1")
               for s in SPLITS}
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    try:
        for split, record, tokens, text_bytes in records:
            writers[split].write(record)
            c = counts[split]
            c["documents"] += 1
            c["tokens"] += tokens
            c["bytes"] += text_bytes
        while writers:
            writers.popitem()[1].close()  # a full disk often shows only here
        index = {"file": str(item.path), **counts, **(extra() if extra else {})}
        (partial / INDEX).write_text(json.dumps(index))
    except BaseException as e:
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(partial, ignore_errors=True)  # gives a full disk its space back
        raise _write_error(e, partial) from None
    shutil.rmtree(item.folder, ignore_errors=True)
    os.replace(partial, item.folder)
    return index


def _write_error(e: BaseException, partial: Path) -> BaseException:
    """A failed write as one line that names the file: array_record's writer raises a
    RuntimeError ("write() failed: No space left on device; writing PATH; at byte N; ..."),
    and a failed `write()` of a Python file is an OSError without the file's name."""
    if isinstance(e, RuntimeError) and "failed" in str(e) and str(partial) in str(e):
        return LlamaJaxError(first_line(e))
    return named(e, partial) if isinstance(e, OSError) else e


def read(items: list[FileShards], split: str, decode: grain.transforms.Map
         ) -> grain.MapDataset:
    """A split's documents over the files' shards, in file order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    shards = [item.shard(split) for item in items if item.index()[split]["documents"]]
    if not shards:
        return grain.MapDataset.source([])
    return grain.MapDataset.source(ArrayRecordDataSource(shards)).map(decode)
