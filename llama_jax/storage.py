"""Run directories on a local disk or on an object store (`gs://`, `s3://`, ...), one API.

Everything a run writes goes through `etils.epath` paths, the path layer Orbax itself uses, so
`run_dir=gs://bucket/run` reaches checkpoints, config, metrics, the lock and the tokenizer
alike. Object stores differ from disks in these ways, which this module absorbs:

- no exclusive create: the run lock is written with a generation precondition (TensorStore's
  conditional write: "only if absent"), which GCS and S3 honour;
- no append: `Appender` rewrites the whole object, at most every few seconds;
- no directories: a prefix "exists" only once an object lies under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import fsspec
from etils import epath

PathLike = str | os.PathLike

# Orbax writes through TensorStore, not gcsfs, so gcsfs's cached folder listings would go
# stale within a run (a new checkpoint unseen); a run lists folders rarely enough to always ask.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
# gcsfs logs each retry of a refused call (e.g. its moveTo fast path, then a copy) with a
# traceback; our own errors name the path and the operation in one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def as_path(path: PathLike) -> epath.Path:
    """`gs://b/run` stays a URL (pathlib would make it `gs:/b/run`); local paths as given."""
    return path if isinstance(path, epath.Path) else epath.Path(path)


def is_remote(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def json_rows(path: epath.Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file such as metrics.jsonl (none if it is missing); a line
    that does not parse (a torn last line: a crash mid-write) is passed over."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def absolute(path: PathLike) -> epath.Path:
    p = as_path(path)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def ensure_dir(path: epath.Path) -> None:
    """A local folder is made; an object store needs none (a prefix exists once an object is
    under it), and making one there could create a bucket a typo named."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def missing_folders(path: epath.Path) -> list[epath.Path]:
    """The local folders `ensure_dir(path)` would make, `path` first (none on a store)."""
    missing: list[epath.Path] = []
    if not is_remote(path):
        p = epath.Path(os.path.abspath(os.fspath(path)))
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
    return missing


def remove_if_empty(folders: list[epath.Path]) -> None:
    """Remove each local folder that is empty, in order; one that is not (or is gone) stays
    as is. (os.rmdir: epath's raises ValueError for a folder that is not empty.)"""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(os.fspath(folder))


def create_exclusive(path: epath.Path, data: bytes) -> bool:
    """Write `data` to `path` only if nothing is there; False if something already was.

    Local files use O_EXCL. Object stores use a conditional write through TensorStore (the
    library Orbax writes arrays with), "if the object does not exist", which the store
    checks atomically: of two writers, exactly one wins.
    """
    if not is_remote(path):
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    import tensorstore as ts

    store = ts.KvStore.open(f"{os.fspath(path.parent).rstrip('/')}/").result()
    absent = store.read(path.name).result()
    if absent.state != "missing":
        return False
    written = store.write(path.name, data, if_equal=absent.stamp.generation).result()
    # An unmet precondition leaves the generation empty; some emulators do not check it,
    # so the object is read back too: the winner is whoever's bytes are there.
    return bool(written.generation) and path.read_bytes() == data


def replace_text(path: epath.Path, text: str) -> None:
    """Replace a small file whole: a rename over it locally, one object write remotely (object
    writes are atomic already)."""
    replace_bytes(path, text.encode())


def replace_bytes(path: epath.Path, data: bytes) -> None:
    """`replace_text` for bytes: readers see the old file or the new one, never a part."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with failures_named(path):
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def named(e: OSError, path: PathLike) -> OSError:
    """`e` with `path` as its file name where it has none: a `write()` that fails (a full
    disk) raises an OSError that names no file, and the one-line report names the path."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror, os.fspath(path))
    return e


@contextlib.contextmanager
def failures_named(path: PathLike) -> Iterator[None]:
    """Within the block, an OSError without a file name is raised as `named(e, path)`."""
    try:
        yield
    except OSError as e:
        renamed = named(e, path)
        if renamed is e:
            raise
        raise renamed from None


class Appender:
    """Lines appended to a text file. Locally an append per line; on an object store, which
    cannot append, the whole file is rewritten, at most once per `every_s` seconds and on
    `flush()` (so a killed run may lose the last few seconds of lines, never earlier ones)."""

    def __init__(self, path: epath.Path, every_s: float = 10.0):
        self.path, self.every_s = path, every_s
        self.remote = is_remote(path)
        self.lines: list[str] = []
        self.dirty, self.last_write = False, 0.0
        if self.remote and path.exists():
            self.lines = path.read_text().splitlines(keepends=True)

    def write(self, line: str) -> None:
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line)
            return
        self.lines.append(line)
        self.dirty = True
        if time.monotonic() - self.last_write >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            self.path.write_text("".join(self.lines))
            self.dirty, self.last_write = False, time.monotonic()


def upload_tree(local: epath.Path, remote: epath.Path) -> None:
    """Copy a local folder's files under `remote`, keeping their relative paths."""
    for root, _, files in os.walk(os.fspath(local)):
        for name in files:
            source = epath.Path(root) / name
            target = remote / os.path.relpath(os.fspath(source), os.fspath(local))
            ensure_dir(target.parent)
            target.write_bytes(source.read_bytes())


def storage_errors() -> tuple[type[BaseException], ...]:
    """What the storage layers raise when a store refuses or fails (beyond OSError), so the
    CLI can report it in one line."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from gcsfs.retry import HttpError

        errors.append(HttpError)
    with contextlib.suppress(ImportError):
        from google.auth.exceptions import GoogleAuthError

        errors.append(GoogleAuthError)
    return tuple(errors)
