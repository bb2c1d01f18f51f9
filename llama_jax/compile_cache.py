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

JAX's cache still traces and lowers the step before it can look the program up (a second
for the default model here, many for a 7B model). `KeptStep` keeps the train step's
executable whole beside JAX's entries, keyed by everything that makes the program (the
settings, the mesh, this package's source, the library versions, XLA's flags and JAX's
settings, the arguments' shapes and placements), and a restart with the same key loads it
without tracing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh

from llama_jax import platform
from llama_jax.config import Config, to_yaml
from llama_jax.storage import is_remote, replace_bytes

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
    is used with the user's JAX settings, as they are.

    In our folder every program is kept, not only those that took a second to compile
    (JAX's default): a restart also runs dozens of small programs (initialising, the
    checkpoint fingerprint, evaluation), each of which would otherwise compile again."""
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
                jax.config.jax_compilation_cache_max_size,
                jax.config.jax_persistent_cache_min_compile_time_secs)
    wanted = (path or None, MAX_BYTES, 0.0) if path else (None, *previous[1:])
    if wanted != previous:
        _use(*wanted)
    try:
        yield path
    finally:
        if wanted != previous:
            _use(*previous)


def _use(path: str | None, max_bytes: int, min_seconds: float) -> None:
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
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


def describe(hits: int, misses: int, seconds: float, folder: str, kept: bool = False) -> str:
    """The line the loop prints after its first step: where the program came from (`kept`:
    a `KeptStep` loaded whole)."""
    if kept:
        return f"loaded whole from the compilation cache in {seconds:.1f} s ({folder})"
    if not folder:
        return f"compiled in {seconds:.1f} s (compilation cache off)"
    if hits and not misses:
        return f"loaded from the compilation cache in {seconds:.1f} s ({folder})"
    if hits:
        return (f"compiled in {seconds:.1f} s, {hits} of {hits + misses} programs from the "
                f"compilation cache ({folder})")
    return f"compiled in {seconds:.1f} s (compilation cache: {folder})"


KEPT_PREFIX = "llama_jax-train-step-"  # JAX's own entries end in -cache; these in .bin
KEEP_NEWEST = 8  # kept executables beyond these (by last use) are deleted


class KeptStep:
    """A jitted step (with `.lower`), compiled ahead of time on its first call, so that the
    moment it is ready to run is known (`ready_at`). In a cache `folder` its executable is
    kept whole there, or loaded whole when a matching one is there.

    A kept file that cannot be read is removed and the step compiled (or loaded from JAX's
    cache); one that cannot be written is not kept: either way the step runs as it would
    without a folder. Kept are only programs compiled here: one that JAX loaded from its own
    cache serialises into an executable that XLA:CPU cannot run (jaxlib 0.10: "Function
    compare_bitcast_fusion not found"); nor programs holding constants outside their
    arguments, which JAX cannot serialise yet."""

    def __init__(self, jitted: Callable[..., Any], cfg: Config, mesh: Mesh, folder: str,
                 log: CompileLog):
        self.jitted, self.cfg, self.mesh, self.folder, self.log = jitted, cfg, mesh, folder, log
        self.kept = False  # the executable came from the folder
        self.ready_at: float | None = None  # time.time() when the first call could run
        self._call: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            compiled = self._load_or_compile(args) if self.folder else \
                self.jitted.lower(*args).compile()
            self._call = platform.synchronous_on_cpu(compiled, self.mesh)
            self.ready_at = time.time()
        return self._call(*args)

    def _load_or_compile(self, args: tuple[Any, ...]) -> Any:
        from jax.experimental import serialize_executable

        path = epath.Path(self.folder) / f"{KEPT_PREFIX}{step_key(self.cfg, self.mesh, args)}.bin"
        start = time.time()
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=list(self.mesh.devices.flat))
            self.kept = True
            self.log.spans.append((start, time.time()))  # loading counts as compiling
            if not is_remote(path):
                os.utime(path)  # last use, for `_forget_old`
            return compiled
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a torn or foreign file: compile over it
            print(f"note: {path} could not be loaded ({type(e).__name__}); removed it, "
                  f"compiling the step again", file=sys.stderr)
            with contextlib.suppress(OSError):
                path.unlink()
        hits = self.log.hits
        compiled = self.jitted.lower(*args).compile()
        fresh = self.log.hits == hits  # not itself loaded from JAX's cache (see the class)
        with contextlib.suppress(Exception):  # not serialisable, or no room: not kept
            if fresh and not compiled._params.const_args:
                replace_bytes(path, pickle.dumps(serialize_executable.serialize(compiled)))
                _forget_old(path.parent)
        return compiled


def _forget_old(folder: epath.Path) -> None:
    kept = sorted(folder.glob(f"{KEPT_PREFIX}*.bin"), key=lambda p: p.stat().mtime)
    for old in kept[:-KEEP_NEWEST]:
        old.unlink(missing_ok=True)


def step_key(cfg: Config, mesh: Mesh, args: tuple[Any, ...]) -> str:
    """What the compiled step depends on, hashed: a change to any of it is a new program.

    Settings that cannot change the program (where the run and its checkpoints live, how
    the processes find each other) are left out, so a restart elsewhere still matches."""
    leaves, tree = jax.tree.flatten(args)
    device = mesh.devices.flat[0]
    parts = {
        "config": to_yaml(dataclasses.replace(cfg, run_dir="", checkpoint=type(cfg.checkpoint)(),
                                              distributed=type(cfg.distributed)())),
        "mesh": (mesh.axis_names, mesh.devices.shape, [d.id for d in mesh.devices.flat]),
        "processes": (jax.process_index(), jax.process_count()),
        "platform": (device.platform, device.device_kind, device.client.platform_version),
        "code": _package_digest(),
        "versions": _versions(),
        "environment": sorted((k, v) for k, v in os.environ.items()
                              if k.startswith(("XLA_", "LIBTPU", "TPU_", "NVIDIA_TF32"))),
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
        "arguments": (str(tree), [(x.shape, str(x.dtype), bool(getattr(x, "weak_type", False)),
                                   str(getattr(x, "sharding", None))) for x in leaves]),
    }
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]


@functools.cache
def _package_digest() -> str:
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


@functools.cache
def _versions() -> tuple[str, ...]:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return tuple(f"{n}={version(n)}" for n in ("jax", "jaxlib", "flax", "optax", "numpy",
                                                 "ml_dtypes", "jax-cuda12-plugin",
                                                 "jax-cuda13-plugin", "libtpu"))
