"""Raw text: local `.txt`/`.jsonl` files, and the offline `python_docs` corpus.

`python_docs` is the English text every CPython ships: the `pydoc_data` help topics and the
docstrings of the standard library, read with `ast` (no module is imported, so nothing runs and
the result depends only on the Python installation).
"""

from __future__ import annotations

import ast
import codecs
import glob
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llama_jax.errors import LlamaJaxError

_SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
                     "turtledemo", "ensurepip"}


@dataclass
class DecodeReport:
    """Bytes that were not UTF-8 and were replaced by U+FFFD, per file."""

    replaced: dict[str, int] = field(default_factory=dict)

    def decode(self, raw: bytes, name: str) -> str:
        count = 0

        def handler(err: UnicodeDecodeError) -> tuple[str, int]:
            nonlocal count
            count += err.end - err.start
            return "\ufffd", err.end

        codecs.register_error("llama_jax_count", handler)
        text = raw.decode("utf-8", errors="llama_jax_count")
        if count:
            self.replaced[name] = self.replaced.get(name, 0) + count
        return text


def expand_files(pattern: str) -> list[Path]:
    """Files matching a glob (or comma-separated globs), sorted; refuse a pattern with none."""
    files: list[Path] = []
    for part in [p.strip() for p in pattern.split(",") if p.strip()]:
        matched = sorted(Path(p) for p in glob.glob(part, recursive=True) if Path(p).is_file())
        if not matched:
            raise LlamaJaxError(f"data.files: no file matches '{part}'")
        files += matched
    if not files:
        raise LlamaJaxError("data.files is empty: give a glob of .txt or .jsonl files")
    for f in files:
        if f.suffix not in (".txt", ".jsonl"):
            raise LlamaJaxError(f"data.files: {f} is neither .txt nor .jsonl")
    return files


def read_documents(path: Path, report: DecodeReport, text_field: str = "text") -> Iterator[str]:
    """A `.txt` file is one document; a `.jsonl` file has one document per line."""
    raw = path.read_bytes()
    text = report.decode(raw, str(path))
    if path.suffix == ".txt":
        if text.strip():
            yield text
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaJaxError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise LlamaJaxError(f"{path}:{lineno}: no string field '{text_field}'")
        if value.strip():
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
    with tmp.open("w") as f:
        for name, text in python_docs_documents():
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    tmp.replace(path)
    return path
