"""Keeping TensorStore's JSON leak out of checkpoint saves, so host memory stays flat.

TensorStore's Python binding leaks part of every Python object it builds from JSON (measured
on 0.1.69 through 0.1.86: `KvStore.Spec.to_json()` of a two-key file spec keeps ~210 bytes per
call; `experimental_collect_matching_metrics` keeps each metric's `values` list, ~3.6 KB per
call after one file write). `repr()` of the same spec leaks nothing. Orbax calls both on every
save: `to_json` once per array (resolving the same base spec for each), and the metrics twice
(a raw-bytes-written figure it only logs, at a level we silence): a leak linear in arrays x
saves, 42 KB of Python objects per save of 50 arrays (10 KB with this module).

So, once per process:
- `KvStore.Spec.to_json` answers from a small cache keyed by the spec's `repr` (its full JSON
  text) and the call's arguments, returning a fresh deep copy each time: the same value, and
  the leak paid once per distinct spec rather than once per array per save;
- Orbax's raw-bytes probe returns 0, which Orbax reads as "nothing to log" (that is its only
  use), so the metric collection is not called at all.
Each is skipped, not guessed at, when the library no longer has the attribute it replaces.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import Any

_CACHED_SPECS = 16  # a save resolves two or three (its folders); each array repeats one


def _memoized_to_json(original: Any) -> Any:
    cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    @functools.wraps(original)
    def to_json(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = (repr(self), args, tuple(sorted(kwargs.items())))
        try:
            found = cache.get(key)
        except TypeError:  # an unhashable argument: no cache, as TensorStore itself
            return original(self, *args, **kwargs)
        if found is None:
            found = cache[key] = original(self, *args, **kwargs)
            if len(cache) > _CACHED_SPECS:
                cache.popitem(last=False)
        return copy.deepcopy(found)

    to_json._llama_jax_memoized = True  # type: ignore[attr-defined]
    return to_json


@functools.cache
def stop_json_leaks() -> None:
    """Install both workarounds (idempotent)."""
    import tensorstore as ts

    spec_class = getattr(getattr(ts, "KvStore", None), "Spec", None)
    original = getattr(spec_class, "to_json", None)
    if original is not None and not getattr(original, "_llama_jax_memoized", False):
        spec_class.to_json = _memoized_to_json(original)
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError:
        return
    if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        tensorstore_utils.get_tensorstore_raw_bytes = _no_raw_bytes


def _no_raw_bytes(direction: Any) -> int:
    """Orbax's probe of bytes TensorStore wrote or read, for a log line only; 0 = skip it."""
    del direction
    return 0
