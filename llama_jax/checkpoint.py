"""Orbax checkpoints: train state, data-iterator state and resolved config, verified on restore.

Layout: RUN_DIR/checkpoints/<step>/{state,data,meta}. Orbax writes each step into a temporary
directory and renames it when complete, so a save killed mid-write never looks like a
checkpoint. `meta` also holds a fingerprint of the state (per leaf, the wrapping uint32 sum of
its bits: exact and independent of sharding), so a checkpoint whose files were damaged after
the save is detected on restore instead of being half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from llama_jax import host_memory, tensorstore_leaks
from llama_jax.config import Config, config_from_yaml_text, to_yaml
from llama_jax.errors import LlamaJaxError, brief
from llama_jax.storage import PathLike, absolute, as_path, is_remote

PyTree = Any
ITEMS = ("state", "data", "meta")
COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a finished step on object stores
# Orbax logs routine read-only notes as WARNING, and a failed background write as ERROR with
# its traceback before raising it in the caller, where `Checkpointer` turns it into one line.
absl_logging.set_verbosity(absl_logging.FATAL)
# Its other write tasks of a failed save end with the same error, which asyncio would log at
# exit as "Task exception was never retrieved".
logging.getLogger("asyncio").setLevel(logging.CRITICAL)
tensorstore_leaks.stop_json_leaks()


class CheckpointError(LlamaJaxError):
    """A checkpoint that is missing, incomplete or damaged."""


class StateMismatch(LlamaJaxError):
    """A sound checkpoint whose arrays do not fit the state asked for (another model shape,
    dtype or optimizer): a settings problem, never a reason to set the checkpoint aside."""


def _path_name(path: tuple[Any, ...]) -> str:
    """A tree path as `a/0/b`, the same for a NamedTuple field, a list index or a dict key
    (Orbax's metadata stores optimizer states' NamedTuples as dicts)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def saved_shapes(state_dir: epath.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of every array Orbax recorded in a saved state."""
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return {_path_name(path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(where: epath.Path, target: PyTree) -> None:
    try:
        saved = saved_shapes(where / "state")
    except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
        raise CheckpointError(f"checkpoint {where} is damaged: no readable array metadata "
                              f"({type(e).__name__})") from None
    wanted = {_path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
              for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    # Only arrays recorded with another shape or dtype: an array missing from the record may
    # be damage (the record is read from the array store), which the restore then reports.
    # A structure that changed is refused before this (run_dir.check_resume), and entries
    # newer than the checkpoint are not asked for (`restore`).
    differ = [f"{key} saved {saved[key]} but wanted {value}"
              for key, value in wanted.items() if key in saved and saved[key] != value]
    if differ:
        more = f" (and {len(differ) - 2} more)" if len(differ) > 2 else ""
        raise StateMismatch(f"checkpoint {where} does not fit this config: "
                            f"{'; '.join(differ[:2])}{more}")


@jax.jit
def fingerprint(tree: PyTree) -> list[jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jnp.sum(jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32), dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint_numpy(x: np.ndarray) -> int:
    """`fingerprint` of one host array, bit for bit the same number."""
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    return int(np.ascontiguousarray(x).view(bits).astype(np.uint32).sum(dtype=np.uint32))


def _fingerprint_host(state: dict[str, PyTree]) -> dict[str, list[int]]:
    """Per top-level entry ("params", "opt_state", "step"), so a partial restore can be
    verified too."""
    sums = [int(v) for v in jax.device_get(fingerprint(state))]  # one program, not one per key
    by_key, start = {}, 0
    for key in sorted(state):  # the order of a dict's leaves
        count = len(jax.tree.leaves(state[key]))
        by_key[key], start = sums[start:start + count], start + count
    return by_key


def _options(cfg: Config, read_only: bool = False) -> ocp.CheckpointManagerOptions:
    c = cfg.checkpoint
    return ocp.CheckpointManagerOptions(
        max_to_keep=c.keep or None, keep_period=c.keep_every or None, create=not read_only,
        enable_async_checkpointing=not read_only, read_only=read_only,
    )


class Checkpointer:
    """Saves and restores one run's checkpoints."""

    def __init__(self, cfg: Config, directory: PathLike, read_only: bool = False):
        self.cfg = cfg
        self.directory = absolute(directory)
        host_memory.fix_mmap_threshold()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self.manager = ocp.CheckpointManager(self.directory, options=_options(cfg, read_only),
                                             item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `checkpoint.every` asks for a save at `step`. The loop also saves at the
        last step and on a stop signal, and never saves the same step twice."""
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Storage failures of a save (disk full, read-only, permission, a vanished folder),
        raised by Orbax here or from its background thread, as one line naming the path."""
        try:
            yield
        except LlamaJaxError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, tensorstore's ValueError, ...
            kept: list[int] = []
            text = brief(e)
            with contextlib.suppress(OSError):
                kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            last = f"step {kept[-1]}" if kept else "none"
            raise CheckpointError(f"{what} in {self.directory} failed: {text} (last "
                                  f"complete checkpoint: {last})") from None

    def incomplete(self) -> list[epath.Path]:
        """Saves that never finished: Orbax's temporary folders on a disk; on an object store
        (where Orbax writes in place and marks a finished step with a commit file) step
        folders without that file."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
        if is_remote(self.directory):
            found += [p for p in self.directory.iterdir()
                      if p.name.isdigit() and not (p / COMMIT_FILE).exists()]
        return sorted(found)

    def save(self, step: int, state: dict[str, PyTree], data_state: dict[str, Any] | None
             ) -> None:
        """`state` is the full train state, or {"params": ...} alone (an imported model)."""
        host_memory.return_freed()
        meta = {"step": step, "config": to_yaml(self.cfg), "contents": sorted(state),
                "fingerprint": _fingerprint_host(state)}
        with self._writing(f"a checkpoint save (step {step} or the one before)"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                meta=ocp.args.JsonSave(meta),
            ), force=True)

    def save_params_streamed(self, step: int,
                             leaves: Iterable[tuple[tuple[str, ...], np.ndarray]]) -> None:
        """A parameters-only checkpoint written one leaf at a time (Orbax partial saves), so
        host memory stays near the largest leaf rather than the model: an imported 70B
        model never has to fit in RAM. Restores exactly like `save(step, {"params": ...})`."""
        from orbax.checkpoint.experimental.v1 import partial

        where = self.directory / str(step)
        if where.exists():
            raise CheckpointError(f"checkpoint {where} already exists")
        sums: list[int] = []
        for path, value in leaves:
            sums.append(fingerprint_numpy(value))
            tree: dict[str, Any] = {}
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            with self._writing("a parameters-only checkpoint save"):  # only the writes:
                partial.save(where, {"params": tree})  # the leaves' own errors stay theirs
            del value, tree, node
        meta = {"step": step, "config": to_yaml(self.cfg), "contents": ["params"],
                "fingerprint": {"params": sums}}
        with self._writing("a parameters-only checkpoint save"):
            partial.finalize(where)
            items = ocp.Checkpointer(ocp.JsonCheckpointHandler())
            items.save(where / "data", args=ocp.args.JsonSave({}))
            items.save(where / "meta", args=ocp.args.JsonSave(meta))

    def wait(self) -> None:
        with self._writing("a checkpoint save"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta"
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - any failure means unreadable
            raise CheckpointError(f"checkpoint {path.parent} is damaged: no readable meta "
                                  f"({type(e).__name__})") from None
        return dict(restored["meta"])

    def restore(self, step: int, abstract_state: PyTree, params_only: bool = False
                ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        """(state, data-iterator state, meta) of `step`, placed as `abstract_state` says.

        With `params_only`, only `abstract_state["params"]` is read (and returned as the state);
        the optimizer state is never loaded.
        """
        where = self.directory / str(step)
        meta = self.read_meta(step)
        contents = meta.get("contents", sorted(abstract_state))
        if not params_only and "opt_state" not in contents:
            raise CheckpointError(f"checkpoint {where} holds parameters only (an imported "
                                  f"model); restore it with checkpoint.restore_params_only=true")
        # Entries newer than the checkpoint (the loss scale, the skip counters) are left out;
        # the caller starts them fresh (step.completed).
        target = {"params": abstract_state["params"]} if params_only else {
            key: value for key, value in abstract_state.items() if key in contents}
        _check_fits(where, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                             partial_restore=len(target) < len(contents)),
                data=ocp.args.JsonRestore(),
            ))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
            raise CheckpointError(f"checkpoint {where} is damaged: {_root_cause(e)}") from None
        state = restored["state"]
        expected = meta.get("fingerprint", {})
        actual = _fingerprint_host(state)
        if any(expected.get(key) != value for key, value in actual.items()):
            raise CheckpointError(f"checkpoint {where} is damaged: its arrays do not match "
                                  f"the fingerprint written at save time")
        return state, dict(restored.get("data") or {}), meta


def _root_cause(e: BaseException) -> str:
    """The innermost error of a chain that says something, as `Type: first line`: Orbax wraps
    TensorStore's precise status (which file, which byte range) in an exception whose own text
    is a repr of the whole TensorStore spec."""
    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and \
            nxt not in chain:
        chain.append(nxt)
    said = [x for x in chain if str(x).strip()] or [e]
    return f"{type(said[-1]).__name__}: {brief(said[-1])}"


@dataclass
class Resolved:
    """A checkpoint location given on the command line."""

    directory: epath.Path  # the `checkpoints` folder
    step: int | None  # None: the latest

    def pick(self, steps: list[int]) -> int | None:
        """The step asked for, else the newest of `steps` (None: there is none)."""
        return self.step if self.step is not None else max(steps, default=None)


def resolve(path: PathLike, step: int | None = None) -> Resolved:
    """RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/STEP -> (checkpoints dir, step)."""
    p = as_path(path)
    if not p.exists():
        raise CheckpointError(f"no such run or checkpoint: {p}")
    if (p / "checkpoints").is_dir():
        return Resolved(p / "checkpoints", step)
    if (p / "meta").is_dir() or (p / "state").is_dir():
        if not p.name.isdigit():
            raise CheckpointError(f"{p} does not look like a checkpoint step directory")
        return Resolved(p.parent, int(p.name) if step is None else step)
    if any(c.name.isdigit() for c in p.iterdir()):
        return Resolved(p, step)
    raise CheckpointError(f"{p} holds no checkpoints")


def saved_meta(path: PathLike, step: int | None = None) -> dict[str, Any] | None:
    """The meta (step, config, contents) saved with a checkpoint, read as the JSON it is on
    disk: no checkpoint manager for a look at what a run holds. None where there is none."""
    where = resolve(path, step)
    steps = sorted(int(c.name) for c in where.directory.iterdir() if c.name.isdigit())
    chosen = where.pick(steps)
    meta_file = where.directory / str(chosen) / "meta" / "metadata"
    if chosen is None or not meta_file.is_file():
        return None
    try:
        return dict(json.loads(meta_file.read_text()))
    except (ValueError, TypeError):  # torn, or not the JSON object a save writes
        raise CheckpointError(f"checkpoint {meta_file.parent.parent} is damaged: its meta is "
                              f"not readable JSON") from None


def is_import(meta: dict[str, Any]) -> bool:
    """A parameters-only checkpoint's meta: weights converted from elsewhere (`convert
    hf-to-orbax`), not a training run of this project."""
    return meta.get("contents") == ["params"]


def holds_only_imported_weights(path: PathLike, step: int | None = None) -> bool:
    meta = saved_meta(path, step)
    return meta is not None and is_import(meta)


def config_of(path: PathLike, step: int | None = None) -> Config:
    """The resolved config saved with a checkpoint (or its run's config.yaml)."""
    meta = saved_meta(path, step)
    if meta is not None:
        return config_from_yaml_text(meta["config"])
    where = resolve(path, step)
    run_config = where.directory.parent / "config.yaml"
    if run_config.is_file():
        return config_from_yaml_text(run_config.read_text())
    raise CheckpointError(f"no config found for checkpoint {where.directory}")


def restore_latest_good(ckpt: Checkpointer, abstract_state: PyTree, params_only: bool = False
                        ) -> tuple[PyTree, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that restores and verifies; damaged ones are set aside and named."""
    for tmp in ckpt.incomplete():
        print(f"warning: ignoring incomplete checkpoint {tmp} (a save that never finished)",
              file=sys.stderr)
    for step in reversed(ckpt.steps()):
        try:
            return ckpt.restore(step, abstract_state, params_only)
        except CheckpointError as e:
            print(f"warning: {e}; falling back to an older checkpoint", file=sys.stderr)
            _set_aside(ckpt.directory / str(step))
            ckpt.manager.reload()
    return None


def _set_aside(path: epath.Path) -> None:
    """Keep a damaged checkpoint (renamed), so nothing saved is lost and the step can be
    saved again."""
    if jax.process_index() == 0 and path.exists():
        target = path.with_name(f"damaged-{path.name}")
        n = 1
        while target.exists():
            target = path.with_name(f"damaged-{path.name}.{n}")
            n += 1
        path.rename(target)  # on an object store: a copy of each object, then a delete
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"llama_jax.set_aside.{path.name}")
