"""Loading a checkpoint for inference, and its loss / perplexity / bits per byte on a split."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from llama_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    config_of,
    holds_only_imported_weights,
    is_import,
    resolve,
)
from llama_jax.config import MESH_AXES, Config, apply_overrides
from llama_jax.convert import config_for_hf, hf_folder, read_hf_params
from llama_jax.data.feed import eval_batches, prepare, source_kind, whole_split_batches
from llama_jax.data.tokenizer import (
    TOKENIZER_FILES,
    Tokenizer,
    load_tokenizer,
    not_a_tokenizer,
    saved_tokenizer,
    tokenizer_file,
)
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.metrics import MetricsWriter
from llama_jax.sharding import make_mesh
from llama_jax.step import PyTree, Setup, evaluate, make_eval_step, make_setup
from llama_jax.storage import PathLike

if TYPE_CHECKING:  # the data pipeline imports TFDS: only runs with real data pay for it
    from llama_jax.data.pipeline import PreparedData


@dataclass
class Loaded:
    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: Any
    step: int
    tokenizer: Tokenizer | None
    setup: Any
    imported: bool = False  # a parameters-only checkpoint (an HF import), not a training run


def with_run_tokenizer(cfg: Config, run_dir: epath.Path) -> Config:
    """Prefer the tokenizer saved in the run directory over rebuilding one from the corpus."""
    saved = saved_tokenizer(run_dir)
    if saved is not None and source_kind(cfg).text:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(saved)))
    return cfg


def refuse_text_without_weights_tokenizer(cfg: Config, weights: PathLike, setting: str,
                                          step: int | None = None) -> None:
    """Refuse text that `cfg` would tokenize with a tokenizer trained afresh on the corpus
    (no `data.tokenizer`, no tokenizer file beside the weights; `with_run_tokenizer` has
    looked) when the weights were trained on some tokenizer's ids: an HF folder, its
    conversion, a run on token files. Each embedding row would stand for another piece and
    the loss would mean nothing, with exit 0. Weights trained on synthetic tokens knew no
    tokenizer: any will do for them."""
    kind = source_kind(cfg)
    if cfg.data.tokenizer or not kind.text or kind.pretokenized:
        return
    if hf_folder(weights) is None and not holds_only_imported_weights(weights, step) \
            and not source_kind(config_of(weights, step)).pretokenized:
        return
    raise CheckpointError(f"{setting} has no tokenizer ({' or '.join(TOKENIZER_FILES)}), "
                          f"and one trained on this corpus would not match its embeddings: set "
                          f"data.tokenizer=PATH to the tokenizer its weights were trained "
                          f"with, or use token ids (data.dataset=megatron)")


def _names(overrides: list[str] | tuple[str, ...], key: str) -> bool:
    """Whether the command line set `key`."""
    return any(o.partition("=")[0].strip() == key for o in overrides)


def _mesh_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """A layout named on the command line is the whole layout: the mesh axes it does not
    name are 1 (fsdp takes the remaining devices unless an axis already does), not the saved
    run's, so `mesh.fsdp=4 mesh.tensor=2` means 4 x 2 on any run."""
    named = {o.split("=", 1)[0].removeprefix("mesh.") for o in overrides
             if o.startswith("mesh.") and "=" in o}
    if not named & set(MESH_AXES):
        return []
    fills = any(o.split("=", 1)[1].strip() == "-1" for o in overrides
                if o.split("=", 1)[0].removeprefix("mesh.") in MESH_AXES)
    defaults = {a: ("-1" if a == "fsdp" and not fills else "1") for a in MESH_AXES}
    defaults.update({f"dcn_{a}": "1" for a in MESH_AXES})
    return [f"mesh.{a}={v}" for a, v in defaults.items() if a not in named]


def _fit_to_devices(cfg: Config, user_named_mesh: bool) -> Config:
    """The saved layout when it fits the devices at hand; otherwise all of them on fsdp,
    said in a note. A layout the user named is taken as given (and refused if it does not
    fit)."""
    try:
        make_mesh(cfg)
        return cfg
    except ConfigError as e:
        if user_named_mesh:
            raise
        fitted = apply_overrides(cfg, [*(f"mesh.{a}=1" for a in MESH_AXES if a != "fsdp"),
                                       "mesh.fsdp=-1",
                                       *(f"mesh.dcn_{a}=1" for a in MESH_AXES)])
        if jax.process_index() == 0:
            print(f"note: the saved layout does not fit here ({e}); using fsdp="
                  f"{jax.device_count()} (override with mesh.*=...)", file=sys.stderr)
        return fitted


def load_for_inference(path: PathLike, overrides: list[str] | tuple[str, ...] = (),
                       step: int | None = None) -> Loaded:
    """Parameters only, restored straight into the shardings of the mesh the config (and the
    overrides) describe, whatever layout they were saved from; on the devices at hand when
    the saved layout does not fit them. An HF folder is read in place (`_load_hf_folder`)."""
    folder = hf_folder(path)
    if folder is not None:
        return _load_hf_folder(folder, overrides, step)
    where = resolve(path, step)
    mesh_defaults = _mesh_overrides(overrides)
    cfg = apply_overrides(config_of(path, step), [*mesh_defaults, *overrides])
    cfg = _fit_to_devices(cfg, bool(mesh_defaults))
    if not _names(overrides, "data.tokenizer"):  # one named on the command line is used
        cfg = with_run_tokenizer(cfg, where.directory.parent)
    _check_named_tokenizer(cfg, overrides)
    refuse_text_without_weights_tokenizer(cfg, path, str(path), step)
    setup = make_setup(cfg)
    ckpt = Checkpointer(cfg, where.directory, read_only=True)
    steps = ckpt.steps()
    chosen = where.pick(steps)
    if chosen is None or chosen not in steps:
        raise CheckpointError(f"no complete checkpoint {'' if chosen is None else chosen} in "
                              f"{where.directory}")
    try:
        state, _, meta = ckpt.restore(chosen, setup.abstract_state, params_only=True)
    finally:
        ckpt.close()
    return Loaded(cfg, setup.mesh, setup.graphdef, state["params"], chosen, _tokenizer(cfg),
                  setup, imported=is_import(meta))


def _tokenizer(cfg: Config) -> Tokenizer | None:
    """`data.tokenizer` (the weights' own copy, after `with_run_tokenizer`); a saved path
    that is gone (a run on token files read on another machine) is no tokenizer."""
    file = tokenizer_file(cfg.data.tokenizer) if cfg.data.tokenizer else None
    return None if file is None else load_tokenizer(file, cfg.data.add_bos, cfg.data.add_eos)


def _check_named_tokenizer(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    """A `data.tokenizer` named on the command line that is not there is refused before the
    weights are read, not taken for "no tokenizer"."""
    path = cfg.data.tokenizer
    if path and _names(overrides, "data.tokenizer") and tokenizer_file(path) is None:
        raise LlamaJaxError(f"data.tokenizer: {not_a_tokenizer(path)}")


# Why a model can have no tokenizer, for the commands that need one to read text.
NO_TOKENIZER = ("has no tokenizer (none beside its weights: trained on synthetic tokens or "
                f"token files, or an HF folder without {' or '.join(TOKENIZER_FILES)})")


def _load_hf_folder(folder: Path, overrides: list[str] | tuple[str, ...],
                    step: int | None) -> Loaded:
    """An HF LLaMA / GPT-NeoX folder read straight into the mesh's shardings, one tensor at
    a time. Nothing is written: no converted copy the size of the model left in /tmp after
    each load, and none that the processes of a multi-host job would each write to their
    own path (Orbax refuses a save whose processes name different directories)."""
    if step not in (None, 0):
        raise CheckpointError(f"{folder} is an HF folder: it holds one set of weights (step 0), "
                              f"not step {step}")
    mesh_defaults = _mesh_overrides(overrides)
    cfg = config_for_hf(folder, folder, saved_tokenizer(folder), [*mesh_defaults, *overrides])
    _check_named_tokenizer(cfg, overrides)
    refuse_text_without_weights_tokenizer(cfg, folder, str(folder))
    setup = make_setup(_fit_to_devices(cfg, bool(mesh_defaults)))
    params = read_hf_params(folder, setup.cfg.model, setup.abstract_state["params"])
    return Loaded(setup.cfg, setup.mesh, setup.graphdef, params, 0, _tokenizer(setup.cfg),
                  setup, imported=True)


class Evaluator:
    """Validation during training: on `train.eval_batches` fixed batches of the validation
    split, every `train.eval_every` steps (the loop adds the first and last step), written as
    `eval/` rows."""

    def __init__(self, setup: Setup, data: PreparedData | None, writer: MetricsWriter,
                 say: Callable[[str], None] | None = None):
        self.every = setup.cfg.train.eval_every
        self.names = data.names if data else None
        self.eval_step = make_eval_step(setup, len(self.names or ()))
        self.batches = eval_batches(setup, data)
        self.bytes_per_token = data.bytes_per_token["validation"] if data else None
        self.writer, self.say = writer, say
        self.results: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int, params: PyTree) -> dict[str, Any]:
        result = {"step": step, **evaluate(self.eval_step, params, iter(self.batches),
                                           self.bytes_per_token, self.names)}
        self.results.append(result)
        self.writer.write({k: v for k, v in result.items()
                           if k not in ("tokens", "tokens_by_source")}, prefix="eval")
        if self.say:
            self.say(f"step {step}: validation loss {result['loss']:.4f} "
                     f"({result['tokens']:,.0f} tokens)")
        return result


def evaluate_checkpoint(path: PathLike, overrides: list[str] | tuple[str, ...] = (),
                        step: int | None = None, split: str = "validation",
                        batches: int = 0) -> dict[str, Any]:
    loaded = load_for_inference(path, overrides, step)
    if loaded.imported and not source_kind(loaded.cfg).text \
            and not _names(overrides, "data.dataset"):
        raise LlamaJaxError(f"{path} is an imported model with no dataset, and its loss on "
                            f"random tokens means nothing: name one, e.g. "
                            f"data.dataset=python_docs (or text_files with data.files=...); "
                            f"data.dataset=synthetic if random tokens are what you want")
    data = prepare(loaded.cfg)
    rows = loaded.cfg.train.global_batch_size
    if data is None:
        stream = iter(eval_batches(loaded.setup, data, split,
                                   batches or loaded.cfg.train.eval_batches))
    else:
        split_tokens = data.stats[split]["tokens"]
        one_pass = max(1, math.ceil(split_tokens / (rows * loaded.cfg.data.seq_len)))
        if batches > one_pass and jax.process_index() == 0:
            # The split repeats: more batches would score the same documents again.
            print(f"note: the {split} split holds about {one_pass:,} batch(es) of {rows} x "
                  f"{loaded.cfg.data.seq_len} tokens; evaluating all of it once, not "
                  f"{batches:,} batches", file=sys.stderr)
        stream = iter(eval_batches(loaded.setup, data, split, batches)) \
            if 0 < batches < one_pass else whole_split_batches(loaded.setup, data, split)
    names = data.names if data else None
    eval_step = make_eval_step(loaded.setup, len(names or ()))
    result = evaluate(eval_step, loaded.params, stream,
                      data.bytes_per_token[split] if data else None, names)
    result.setdefault("bits_per_byte", None)  # synthetic tokens stand for no bytes: JSON null
    return {"step": loaded.step, "split": split, **result}
