"""JAX's persistent compilation cache for `train`, and what compiling cost.

A restart of a large model spends minutes compiling the same program again (llama3-8b's step
takes 137 s to compile for v5p here). JAX can keep compiled executables on disk
(`jax_compilation_cache_dir`); `train.compilation_cache_dir` turns that on by default, under
the user's cache directory, and a restart loads the step instead. The setting is applied for
the duration of `train` and restored after, so other commands in the same process (`bench`
reading XLA's memory plan) are not served from it.

JAX reports its compilation work through `jax.monitoring`: time spans of tracing, lowering and
backend compiles, and an event per cache hit and miss. `CompileLog` listens to those, so the
loop can say whether its step came from the cache and how long compiling took; the spans are
what goodput counts as compilation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import jax
from etils import epath

_SPAN_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "/jax/core/compile/backend_compile_duration")
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


MAX_BYTES = 20 * 2**30  # least recently used entries go beyond this


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llama_jax", "xla")


@contextlib.contextmanager
def persistent_cache(setting: str, announce: bool) -> Iterator[str]:
    """JAX's compilation cache in `setting` while the block runs ("auto": JAX's own setting if
    the user made one, JAX_COMPILATION_CACHE_DIR, else `default_dir()`; "": off); yields the
    folder in use ("" when off). A folder that cannot be made turns the cache off with a
    note: a cache is never a reason for a run to fail.

    JAX writes an entry in place, without a lock, unless the cache has a size bound; two runs
    compiling the same program at once could then leave a torn entry that every later start
    reads, warns about and compiles again. So a folder of ours gets a bound (`MAX_BYTES`),
    which makes JAX take a file lock around every read and write. A folder the user gave JAX
    is used with the user's JAX settings, as they are."""
    if setting == "auto" and jax.config.jax_compilation_cache_dir:
        yield jax.config.jax_compilation_cache_dir
        return
    path = default_dir() if setting == "auto" else setting
    if path:
        try:
            epath.Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if announce:
                print(f"note: compilation cache off: cannot create {path} "
                      f"({e.strerror or e}); set train.compilation_cache_dir", file=sys.stderr)
            path = ""
    previous = (jax.config.jax_compilation_cache_dir,
                jax.config.jax_compilation_cache_max_size)
    wanted = (path or None, MAX_BYTES if path else previous[1])
    if wanted != previous:
        _use(*wanted)
    try:
        yield path
    finally:
        if wanted != previous:
            _use(*previous)


def _use(path: str | None, max_bytes: int) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is on; ask it again


class CompileLog:
    """Every compilation JAX reports in this process: time spans (start, end) and cache
    hits and misses. One listener per process, registered on first use."""

    _instance: CompileLog | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.hits = 0
        self.misses = 0

    @classmethod
    def get(cls) -> CompileLog:
        with cls._guard:
            if cls._instance is None:
                cls._instance = CompileLog()
                jax.monitoring.register_event_time_span_listener(cls._instance._span)
                jax.monitoring.register_event_listener(cls._instance._event)
            return cls._instance

    def _span(self, event: str, start: float, end: float, **_: object) -> None:
        if event in _SPAN_EVENTS:
            self.spans.append((start, end))

    def _event(self, event: str, **_: object) -> None:
        if event == _HIT:
            self.hits += 1
        elif event == _MISS:
            self.misses += 1

    def seconds_between(self, start: float, end: float) -> float:
        """Wall seconds within [start, end] spent compiling (overlapping spans, such as a
        nested function traced inside another, counted once)."""
        spans = sorted((max(a, start), min(b, end)) for a, b in list(self.spans)
                       if b > start and a < end)
        total, reach = 0.0, start
        for a, b in spans:
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total


    def forget_before(self, t: float) -> None:
        self.spans = [(a, b) for a, b in self.spans if b > t]


def describe(hits: int, misses: int, seconds: float, folder: str) -> str:
    """The line the loop prints after its first step: where the program came from."""
    if not folder:
        return f"compiled in {seconds:.1f} s (compilation cache off)"
    if hits and not misses:
        return f"loaded from the compilation cache in {seconds:.1f} s ({folder})"
    if hits:
        return (f"compiled in {seconds:.1f} s, {hits} of {hits + misses} programs from the "
                f"compilation cache ({folder})")
    return f"compiled in {seconds:.1f} s (compilation cache: {folder})"
