"""Filters on this process's own stdout and stderr file descriptors.

Two things in a multi-process run write from C++ straight to the file descriptors, where no
Python logging setting reaches: gloo's per-rank "[Gloo] Rank N is connected ..." lines (fd 1),
and the reports of a C++ abort (fd 2) -- the JAX distributed service's fatal log with its
stack trace when a peer stops sending heartbeats, or `std::terminate` on an exception thrown
in gloo's I/O thread when a peer's connection breaks mid-collective. Both are handled by
copying the descriptor through a pipe and deciding each line by its start:

- `LineFilter` (a thread) drops the lines that start with a prefix.
- `FatalReport` (a small helper process, which outlives the abort) passes stderr through until
  a C++ abort's report begins, keeps the rest in a file, and ends with one line that names
  the cause and the file.

This file is also the helper's program (`python -P output_filter.py PROCESS_ID`), so it
imports only the standard library.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from enum import Enum


class Verdict(Enum):
    PASS = "pass"  # copy the line
    DROP = "drop"  # leave the line out
    HOLD = "hold"  # keep this line and everything after it, write nothing more


Decide = Callable[[bytes], "Verdict | None"]  # a line's start -> verdict, None: too short yet


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def pump(read_fd: int, write_fd: int, decide: Decide) -> bytes:
    """Copy `read_fd` to `write_fd` as bytes arrive, line by line; return what was held.

    Only a line's start waits, and only while `decide` cannot yet tell, so progress bars
    (carriage returns, no newline) and prompts pass at once.
    """
    pending, verdict, held = b"", None, bytearray()
    while chunk := os.read(read_fd, 65536):
        if held:
            held += chunk
            continue
        pending += chunk
        out = bytearray()
        while pending:
            if verdict is None:
                verdict = decide(pending)
                if verdict is None:
                    if b"\n" not in pending:
                        break
                    verdict = Verdict.PASS
            if verdict is Verdict.HOLD:
                held += pending
                pending = b""
                break
            end = pending.find(b"\n")
            piece, pending = ((pending, b"") if end < 0 else
                              (pending[:end + 1], pending[end + 1:]))
            if verdict is Verdict.PASS:
                out += piece
            if end >= 0:
                verdict = None
        write_all(write_fd, bytes(out))
    if pending and verdict is not Verdict.DROP:
        write_all(write_fd, pending)
    os.close(read_fd)
    return bytes(held)


class OncePerProcess:
    """A filter replaces a file descriptor of the whole process: `install` it once."""

    installed: OncePerProcess | None = None

    @classmethod
    def install(cls, *args: object) -> None:
        if cls.installed is None:
            cls.installed = cls(*args)


class LineFilter(OncePerProcess):
    """Drops the lines of this process's stdout that start with `prefix` (gloo's per-rank
    connection lines: one per process, N lines under SLURM). fd 1 is replaced by a pipe that
    a thread copies to the real stdout."""

    def __init__(self, prefix: bytes):
        self.prefix = prefix
        sys.stdout.flush()
        self.real = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        self.thread = threading.Thread(target=pump, args=(read, self.real, self._decide),
                                       daemon=True, name="stdout-filter")
        self.thread.start()
        atexit.register(self.close)

    def _decide(self, line: bytes) -> Verdict | None:
        if line.startswith(self.prefix):
            return Verdict.DROP
        if b"\n" not in line and self.prefix.startswith(line):
            return None  # not yet known whether this line is one to drop
        return Verdict.PASS

    def close(self) -> None:
        """Put the real stdout back (closing the pipe's last writer) and let the thread copy
        what is left."""
        try:
            sys.stdout.flush()
        finally:
            os.dup2(self.real, 1)
            self.thread.join(timeout=10)


# absl/glog's fatal line "F1129 00:10:36.370374   22020 client.h:80] ..." and libstdc++'s
# "terminate called after throwing an instance of 'T'" both start a C++ abort's report.
_GLOG_FATAL, _GLOG_SHAPE = re.compile(rb"F\d{4} \d"), b"F0000 0"
_TERMINATE = b"terminate called "


def decide_fatal(line: bytes) -> Verdict | None:
    """HOLD where a C++ abort's report begins, PASS otherwise."""
    head = line[:len(_GLOG_SHAPE)]
    if line.startswith(_TERMINATE) or _GLOG_FATAL.fullmatch(head):
        return Verdict.HOLD
    if b"\n" not in line and (_TERMINATE.startswith(line) or (
            len(head) < len(_GLOG_SHAPE)
            and _GLOG_FATAL.fullmatch(head + _GLOG_SHAPE[len(head):]))):
        return None
    return Verdict.PASS


def summarize(report: str) -> str:
    """The cause of a C++ abort, in a few words, from its report."""
    unhealthy = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)",
                          report)
    if unhealthy:
        tasks = ", ".join(unhealthy.group(1).replace(",", " ").split())
        return (f"process {tasks} stopped sending heartbeats to the JAX distributed service "
                f"(unhealthy: it died, hangs or was stopped); its own log names the cause")
    thrown = re.search(r"terminate called after throwing an instance of '([^']+)'\s*"
                       r"(?:what\(\):\s*(.*))?", report)
    if thrown:
        kind, what = thrown.group(1), (thrown.group(2) or "").strip()
        what = re.sub(r"^\[[^\]]*\]\s*", "", what)  # "[enforce fail at file.cc:123] "
        if kind.startswith("gloo::"):
            return (f"a gloo collective failed, most likely because a peer process died or "
                    f"was stopped ({kind}: {what[:200]})")
        return f"uncaught C++ exception {kind}: {what[:200]}"
    first = report.strip().splitlines()[0] if report.strip() else "aborted"
    return re.sub(r"^F\d{4} [\d:.]+\s+\d+ \S+\] ", "", first)[:300]


class FatalReport(OncePerProcess):
    """Turns a C++ abort's report on this process's stderr into one line.

    fd 2 becomes a pipe to a helper process that copies it to the real stderr. From the line
    where an abort's report starts it keeps everything in a file instead; when the pipe
    closes (this process ended) it writes "distributed: process N stopped: <cause> (full
    report: <file>)". The helper ignores SIGINT and SIGTERM, which a terminal or a scheduler
    sends to the whole process group, so it sees this process's last words during a
    preemption save."""

    def __init__(self, process_id: int):
        sys.stderr.flush()
        # -P: the script's folder (llama_jax/, which has a platform.py) stays off sys.path
        self.helper = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), str(process_id)],
            stdin=subprocess.PIPE, stdout=2, stderr=2)
        assert self.helper.stdin is not None
        os.dup2(self.helper.stdin.fileno(), 2)
        self.helper.stdin.close()


def _helper(process_id: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    held = pump(0, 1, decide_fatal)
    if not held:
        return 0
    report = held.decode(errors="replace")
    with tempfile.NamedTemporaryFile("w", prefix=f"llama_jax-abort-p{process_id}-",
                                     suffix=".log", delete=False) as f:
        f.write(report)
    line = (f"distributed: process {process_id} stopped: {summarize(report)} "
            f"(full report: {f.name})\n")
    write_all(1, line.encode())
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1]))
