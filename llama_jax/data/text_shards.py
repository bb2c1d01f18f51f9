"""Local text files as per-file array_record shards of their documents' text
(file_shards.py): the random-access form Grain's global shuffle reads, built once per file,
streaming (no file is ever held whole), with bad records refused or skipped and counted."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import grain

from llama_jax.config import DataConfig
from llama_jax.data import file_shards
from llama_jax.data.corpus import BadRecords, read_documents
from llama_jax.data.file_shards import SPLITS, FileShards
from llama_jax.errors import LlamaJaxError


def in_validation(text: str, fraction: float) -> bool:
    """The split rule: the first 8 bytes of the text's SHA-1, as a fraction of 2^64, below
    `fraction`. Stable across runs, file order and machines."""
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def text_settings(data: DataConfig) -> str:
    """What shapes a file's records besides its bytes (with the layout's version)."""
    return f"text1|{data.text_field}|{data.validation_fraction}|{data.skip_bad_records}"


def documents_of(path: Path, data: DataConfig, bad: BadRecords | None = None
                 ) -> Iterator[tuple[str, str]]:
    """(split, text) of each document of an input file, in file order."""
    bad = bad or BadRecords(skip=data.skip_bad_records)
    for text in read_documents(path, bad, data.text_field):
        yield ("validation" if in_validation(text, data.validation_fraction) else "train"), text


def stored_documents(item: FileShards) -> Iterator[tuple[str, str]]:
    """(split, text) of a finished text folder's documents: each split in file order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    for split in SPLITS:
        count = item.index()[split]["documents"]
        if not count:
            continue
        source = ArrayRecordDataSource([item.shard(split)])
        for start in range(0, count, 256):
            for record in source.__getitems__(list(range(start, min(start + 256, count)))):
                yield split, record.decode("utf-8")


def text_files(data: DataConfig, files: list[Path]) -> list[FileShards]:
    return file_shards.shards_for(Path(data.cache_dir) / "text", files,
                                  text_settings(data))


def build_text(name: str, data: DataConfig, files: list[Path]) -> list[FileShards]:
    """Each file's text shards (built where missing), checked: a corpus with no text, or with
    an empty split, is refused in one line."""
    items = text_files(data, files)
    todo = [item for item in items if not item.done]
    for item in todo:
        bad = BadRecords(skip=data.skip_bad_records)
        index = file_shards.write(item, _text_records(item.path, data, bad), lambda b=bad: {
            "skipped": sum(b.skipped.values())})
        if index["skipped"]:
            print(f"warning: {item.path}: {index['skipped']} bad record(s) skipped "
                  f"(data.skip_bad_records)", file=sys.stderr)
    if todo:
        print(f"wrote the text of {len(todo)} file(s) as array_record shards in "
              f"{Path(data.cache_dir) / 'text'}", file=sys.stderr)
    counts = {split: sum(item.index()[split]["documents"] for item in items) for split in SPLITS}
    if not any(counts.values()):
        shown = ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "")
        raise LlamaJaxError(f"data: the corpus ({shown}) has no text")
    for split, count in counts.items():
        if count == 0:
            raise LlamaJaxError(
                f"data: none of the {sum(counts.values())} documents of {name} fell in the "
                f"{split} split (data.validation_fraction={data.validation_fraction}); "
                f"change it or add documents")
    return items


def _text_records(path: Path, data: DataConfig, bad: BadRecords
                  ) -> Iterator[file_shards.Record]:
    for split, text in documents_of(path, data, bad):
        raw = text.encode("utf-8")
        yield split, raw, 0, len(raw)


class DecodeText(grain.transforms.Map):
    def map(self, record: bytes) -> dict[str, bytes]:
        return {"text": record}


def text_splits(items: list[FileShards]) -> dict[str, grain.MapDataset]:
    return {split: file_shards.read(items, split, DecodeText()) for split in SPLITS}


def skipped_records(items: list[FileShards]) -> int:
    return sum(item.index().get("skipped", 0) for item in items)
