"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line report quotes of a library's multi-line error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# TensorStore's annotations at the end of a status: `[tensorstore_spec='{...}']` (the
# whole JSON spec, often twice), `[source locations='...']`, `[os_error_code='28']`.
_ANNOTATION = re.compile(r"\s*\[[\w\[\] ]+='[^']*'\]\s*$")


def brief(e: BaseException, limit: int = 500) -> str:
    """`first_line(e)` without TensorStore's trailing annotations and within `limit`
    characters, its start and its end kept: a storage library's line names the operation
    first and the cause last ("Error writing X in OCDBT database at local file Y: ...: No
    space left on device"); a cut at 300 characters had lost the cause."""
    text = first_line(e)
    while (trimmed := _ANNOTATION.sub("", text)) != text:
        text = trimmed
    if len(text) <= limit:
        return text
    tail = limit * 3 // 5
    return f"{text[:limit - tail - 5]} ... {text[-tail:]}"


def os_error_line(e: OSError) -> str:
    """An I/O fault (disk full, read-only, permission denied, a vanished directory) as the
    path and the system's words for it."""
    return (f"{e.filename}: " if e.filename else "") + (e.strerror or first_line(e))


def check_can_write(out: Path, what: str) -> None:
    """Refuse a local output folder that could not be written before the work that fills it
    (minutes of compiling or tracing), without creating anything: its nearest existing
    folder must be a writable directory. `what` names the setting in the message."""
    existing = Path(out)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LlamaJaxError(f"{what}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise LlamaJaxError(f"{what}: {existing} is " + (
            "on a read-only file system" if read_only else "not writable"))


def script_main(name: str, main: Callable[[], int | None]) -> NoReturn:
    """How each script in scripts/ ends: a bad config, argument or path, and an I/O fault,
    in one line as the CLI says them (`NAME: error: ...`, exit 1), not a traceback."""
    try:
        code = main()
    except LlamaJaxError as e:
        sys.exit(f"{name}: error: {e}")
    except OSError as e:
        sys.exit(f"{name}: error: {os_error_line(e)}")
    sys.exit(code)


class LlamaJaxError(Exception):
    """A problem with the user's input or environment, described in one line."""


class ConfigError(LlamaJaxError):
    """A setting that is unknown, of the wrong type, or impossible."""
