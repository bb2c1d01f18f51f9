"""This process's host memory: what is resident, and handing freed heap pages back.

Each checkpoint save's writer threads (Orbax, TensorStore) allocate in their own malloc
arenas and free it all when done, but glibc keeps the freed pages: resident memory grew by
about 0.3 MB per save (tiny model, 60 saves: +9%) and fell back to its first level when
trimmed. So saves trim first, a logged figure is taken after trimming, and glibc's mmap
threshold is fixed while checkpoints are saved (`fix_mmap_threshold`).
"""

from __future__ import annotations

import ctypes
import functools

import psutil

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the most glibc's own sliding threshold reaches (64-bit)


@functools.cache
def fix_mmap_threshold() -> None:
    """glibc serves blocks above a threshold by their own mmap, returned whole on free. By
    default that threshold slides up to the largest such block freed so far (at most 32 MiB)
    and the trim threshold with it, to twice that: then memory freed at the top of a malloc
    arena stays resident up to 64 MiB per arena. Checkpoint saves run on threads with arenas
    of their own, and the tiny run's resident memory rose ~20 MB over its first 30 saves
    before levelling off (+5% at step 300 against step 50). Fixing the threshold at its own
    ceiling keeps large blocks where they were and the trim threshold at 128 KiB: +0.9%
    (docs/performance.md). Process-wide, once; elsewhere than glibc, nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def return_freed() -> None:
    """glibc's `malloc_trim(0)`: free heap pages back to the system (elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_gib() -> float:
    """Resident memory now, GiB: a metrics row's figure, so growth with steps or saves shows."""
    return round(psutil.Process().memory_info().rss / 2**30, 4)
