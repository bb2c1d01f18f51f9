"""One builder at a time per data cache.

Two commands that find the same data missing (two runs started together on a fresh
`data.cache_dir`, or `prepare-data` beside a `train`) would otherwise both write it: the
python_docs corpus through one temporary file (two writers interleave into a file that
parses as neither) and each input file's shards through one `.partial` folder (the second
removes the first's half-written folder under it). The builder holds an exclusive `flock`
on `data.cache_dir/.build.lock`; another waits, then finds everything built. The kernel
drops the lock of a process that dies, so a killed build never leaves the cache locked.
As the HF datasets cache does (a file lock around each build), and for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".build.lock"


@contextlib.contextmanager
def building(cache_dir: Path) -> Iterator[None]:
    """Hold the build lock of `cache_dir` for the block, waiting (with a note) while another
    process holds it. A cache that cannot take a lock (a read-only folder of prebuilt data,
    a file system without `flock`) is used without one: nothing will be built there, or the
    build fails on its own with its own message."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building {cache_dir} (it holds "
                  f"{cache_dir / LOCK_NAME}) ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock
