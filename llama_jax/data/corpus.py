"""Raw text: local files (`.txt`, JSON lines plain or compressed, parquet, HF arrow folders),
and the offline `python_docs` corpus.

`python_docs` is the English text every CPython ships: the `pydoc_data` help topics and the
docstrings of the standard library, read with `ast` (no module is imported, so nothing runs and
the result depends only on the Python installation).
"""

from __future__ import annotations

import ast
import glob
import gzip
import io
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import zstandard

from llama_jax.errors import LlamaJaxError
from llama_jax.storage import failures_named

_SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
                     "turtledemo", "ensurepip"}


FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
ARROW_FOLDER = "state.json"  # what marks a folder written by HF `datasets.save_to_disk`


def format_of(path: Path) -> str:
    """The file's format by its name (an HF arrow folder: "arrow"); "" if none we read."""
    if path.is_dir():
        return "arrow" if (path / ARROW_FOLDER).is_file() else ""
    return next((f for f in FORMATS if path.name.endswith(f)), "")


def expand_files(pattern: str) -> list[Path]:
    """Files matching a glob (or comma-separated globs), sorted; a folder stands for the
    files of known formats under it (an HF `save_to_disk` folder for itself). Refuse a
    pattern with none, and a named file of no known format."""
    files: list[Path] = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        matched: list[Path] = []
        for hit in sorted(Path(p) for p in glob.glob(part, recursive=True)):
            if hit.is_dir() and not format_of(hit):
                matched += sorted(p for p in hit.rglob("*") if format_of(p) and not
                                  any(format_of(a) for a in p.parents if a != hit and
                                      hit in a.parents))
            else:
                matched.append(hit)
        if not matched:
            raise LlamaJaxError(f"data.files: no file matches '{part}'")
        files += matched
    if not files:
        raise LlamaJaxError("data.files is empty: give a glob of text, JSON lines or parquet "
                            "files")
    for f in files:
        if not format_of(f):
            raise LlamaJaxError(f"data.files: {f} is not one of {', '.join(FORMATS)} or an "
                                f"HF save_to_disk folder")
    return files


@dataclass
class BadRecords:
    """`data.skip_bad_records`: what bad records do (raise, or skip and count)."""

    skip: bool = False
    skipped: dict[str, int] = field(default_factory=dict)

    def bad(self, file: Path, at: str, problem: str) -> None:
        """A bad record of `file` (`at`: ":LINE", " row N" or ""): refused in one line, or
        with `skip` counted and left out."""
        if not self.skip:
            raise LlamaJaxError(f"{file}{at}: {problem} (data.skip_bad_records=true skips "
                                f"such records and counts them)")
        self.skipped[str(file)] = self.skipped.get(str(file), 0) + 1


def read_documents(path: Path, bad: BadRecords, text_field: str = "text") -> Iterator[str]:
    """A `.txt` file is one document; JSON lines (plain, gzip, zstd) one per line; parquet
    and HF arrow folders one per row of column `text_field`. Streamed: no file is ever held
    whole (parquet and arrow a record batch at a time)."""
    kind = format_of(path)
    try:
        if kind == ".txt":
            text = _decoded(path.read_bytes(), path, "", bad)
            if text is not None and text.strip():
                yield text
        elif kind == ".parquet":
            yield from _table_documents(path, _parquet_batches(path, text_field), text_field, bad)
        elif kind == "arrow":
            yield from _table_documents(path, _arrow_batches(path), text_field, bad)
        else:
            yield from _json_lines(path, kind, text_field, bad)
    except LlamaJaxError:
        raise
    except (OSError, EOFError, ValueError, zstandard.ZstdError, pa.ArrowException) as e:
        what = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd", ".parquet": "parquet",
                "arrow": "Arrow"}.get(kind, kind)
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise LlamaJaxError(f"{path}: not readable as {what} ({first})") from None


def _decoded(raw: bytes, file: Path, at: str, bad: BadRecords) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.bad(file, at, f"byte {e.start} is not UTF-8 text")
        return None


def _open_lines(path: Path, kind: str) -> Any:
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")
    if kind == ".jsonl.zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _json_lines(path: Path, kind: str, text_field: str, bad: BadRecords) -> Iterator[str]:
    with _open_lines(path, kind) as f:
        for lineno, raw in enumerate(f, start=1):
            at = f":{lineno}"
            line = _decoded(raw, path, at, bad)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.bad(path, at, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                bad.bad(path, at, f"a JSON {type(record).__name__}, not an object")
                continue
            value = record.get(text_field)
            if not isinstance(value, str):
                bad.bad(path, at, f"no string field '{text_field}'")
                continue
            if value.strip():
                yield value


def _parquet_batches(path: Path, text_field: str) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise LlamaJaxError(f"{path}: no column '{text_field}' (columns: "
                            f"{', '.join(pf.schema_arrow.names[:10])}); set data.text_field")
    yield from pf.iter_batches(batch_size=1024, columns=[text_field])


def _arrow_batches(folder: Path) -> Iterator[pa.RecordBatch]:
    """An HF `save_to_disk` folder: its state.json lists Arrow stream files, in order."""
    state = json.loads((folder / ARROW_FOLDER).read_text())
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(folder / entry["filename"])) as source:
            yield from pa.ipc.open_stream(source)


def _table_documents(path: Path, batches: Iterator[pa.RecordBatch], text_field: str,
                     bad: BadRecords) -> Iterator[str]:
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            raise LlamaJaxError(f"{path}: no column '{text_field}' (columns: "
                                f"{', '.join(batch.schema.names[:10])}); set data.text_field")
        column = batch.column(text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise LlamaJaxError(f"{path}: column '{text_field}' holds {column.type}, not text")
        for value in column.to_pylist():
            row += 1
            if value is None:
                bad.bad(path, f" row {row}", f"'{text_field}' is null")
            elif value.strip():
                yield value


def python_docs_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of every pydoc topic and every stdlib module's docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_STDLIB_DIRS & set(rel.parts[:-1]):
            continue
        text = _docstrings(path)
        if text:
            yield f"module:{rel.as_posix()}", text


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def write_python_docs(out_dir: Path) -> Path:
    """Write the python_docs corpus as one `.jsonl` file (once; it never changes for a Python)."""
    version = ".".join(map(str, sys.version_info[:3]))
    path = out_dir / f"python_docs-{version}.jsonl"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with failures_named(tmp), tmp.open("w") as f:
            for name, text in python_docs_documents():
                f.write(json.dumps({"name": name, "text": text}) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back
    return path
