"""The one typed schema of every setting, loaded from YAML plus `a.b=value` overrides.

OmegaConf does the loading, merging and type coercion against the dataclass schema; this
module turns its exceptions into one-line messages and adds the cross-field checks that a type
system cannot express (heads dividing the width, known choices, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from llama_jax.data.sources import MEGATRON, SYNTHETIC, TEXT_FILES, kind_of
from llama_jax.errors import ConfigError
from llama_jax.storage import as_path, ensure_dir, replace_text

# The presets ship inside the package (a checkout's `configs/` links here), so `info tiny`,
# `base: tiny` and `configs/tiny.yaml` all work, also after a non-editable install.
PRESET_DIR = Path(__file__).resolve().parent / "configs"

# Settings with a fixed set of values: each set is listed here once. OmegaConf checks the
# fields typed with them; `validate` and the error messages read the same lists.
Dtype = Literal["float32", "bfloat16", "float16"]
NormKind = Literal["rmsnorm", "layernorm"]
Activation = Literal["swiglu", "gelu"]
PositionKind = Literal["rope", "learned"]
RopeScaling = Literal["none", "linear", "llama3"]
Remat = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                "projections_and_attention", "offload_dots_with_no_batch_dims"]
AttentionImpl = Literal["xla", "dot_product_attention", "cudnn"]
ContextParallel = Literal["all_gather", "ring"]
Quantization = Literal["none", "fp8"]
Fp8Gradients = Literal["e4m3", "e5m2"]
Fp8WeightGradient = Literal["fp8", "bf16"]
Fp8Scaling = Literal["current", "delayed"]
GradReduceDtype = Literal["float32", "compute"]
Schedule = Literal["constant", "cosine", "linear", "wsd"]
Enabled = Literal["auto", "true", "false"]
NonFinitePolicy = Literal["auto", "skip", "stop", "rollback"]
LOSS_SCALE_WORDS = ("auto", "dynamic", "none")
DTYPES = typing.get_args(Dtype)
LOGICAL_AXES = (
    "batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers",
    "norm", "position",
)
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def _default_rules() -> dict[str, list[str]]:
    return {
        "batch": ["data", "fsdp"],
        "length": ["sequence"],
        "embed": ["fsdp", "sequence"],  # parameters: FSDP over the sequence axis too
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "mlp": ["tensor"],
        "vocab": ["tensor"],
        "head_dim": [],
        "layers": [],
        "norm": [],
        "position": [],
    }


@dataclass
class RopeScalingConfig:
    type: RopeScaling = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 4096
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "swiglu"
    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    parallel_residual: bool = False
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    init_std: float = 0.02
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    # the LM head's output before the float32 loss: float32 (the product's own accumulator),
    # or rounded to the compute dtype as MaxText (logits_dot_in_fp32=false), transformers and
    # torchtitan do, which halves the bytes the loss reads (docs/precision.md)
    logits_dtype: Dtype = "float32"
    # the dtype weight gradients leave their matmuls in (and embedding rows sum their tokens'
    # gradients in), and so the one XLA sums them across devices in: float32 (torchtitan's
    # FSDP reduce_dtype, DDP's f32 .grad), or the compute dtype (half the interconnect bytes;
    # what XLA does when nothing says otherwise)
    grad_reduce_dtype: GradReduceDtype = "float32"
    remat: Remat = "none"
    scan_layers: bool = True
    attention: AttentionImpl = "xla"
    attention_block: int = 128  # xla attention: causal query blocks of this many tokens (0: off)
    # cudnn attention on packed rows: the most documents (runs of one segment id, padding
    # included) a row may hold for cuDNN's packed layout; a batch with a fuller row takes the
    # xla blocks for that step (same result, slower). 0: packed rows always take the blocks.
    max_segments_per_row: int = 16
    # how attention reaches the keys of other devices when mesh.sequence splits the sequence
    context_parallel: ContextParallel = "all_gather"
    # the LM head and loss over this many slices of the positions (loss.chunked_head_loss_sums);
    # 0: as few as keep one slice's logits (in logits_dtype) under 1 GiB per device; 1: one pass
    loss_chunks: int = 0
    quantization: Quantization = "none"  # fp8: the block's projections (fp8.py)
    fp8_gradients: Fp8Gradients = "e4m3"  # the output gradients' format
    fp8_weight_gradient: Fp8WeightGradient = "fp8"  # the weight gradient's product
    fp8_head: bool = False  # the LM head's products in fp8 too (current scaling)
    # current: each operand scaled by its own amax in the same step; delayed: by the largest
    # amax of the last `fp8_amax_history` steps, kept in the train state (fp8.py)
    fp8_scaling: Fp8Scaling = "current"
    fp8_amax_history: int = 16

    @property
    def reduce_grads_in_f32(self) -> bool:
        return self.grad_reduce_dtype == "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Width of the rotated part of each head (partial rotary: GPT-NeoX rotary_pct)."""
        return int(self.head_size * self.rotary_pct)


# The settings that say what function a set of weights computes (the rest say how a step
# runs: dtypes, remat, kernels, fp8), for a run that starts from another's weights. Head
# counts and widths are compared resolved (an unset `num_kv_heads` is `num_heads`).
ARCHITECTURE = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_layers": "num_layers",
    "num_heads": "num_heads", "kv_heads": "num_kv_heads", "head_size": "head_dim",
    "max_position_embeddings": "max_position_embeddings", "norm": "norm",
    "norm_eps": "norm_eps", "activation": "activation", "position": "position",
    "rope_theta": "rope_theta", "rotary_pct": "rotary_pct", "rope_scaling": "rope_scaling",
    "parallel_residual": "parallel_residual", "tie_embeddings": "tie_embeddings",
    "attention_bias": "attention_bias", "mlp_bias": "mlp_bias",
}


def architecture_differences(source: ModelConfig, target: ModelConfig) -> list[str]:
    """`model.key: source's -> target's` for each architecture setting that differs."""
    out = []
    for attribute, key in ARCHITECTURE.items():
        old, new = getattr(source, attribute), getattr(target, attribute)
        if old != new:
            if dataclasses.is_dataclass(old):
                old, new = dataclasses.asdict(old), dataclasses.asdict(new)
            out.append(f"model.{key}: {old!r} -> {new!r}")
    return out


@dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    rules: dict[str, list[str]] = field(default_factory=_default_rules)


@dataclass
class SourceConfig:
    """One named source of a mixture (`data.sources`). Empty fields take `data.*`'s value."""

    name: str = ""
    dataset: str = ""  # any `data.dataset` kind except synthetic
    files: str = ""  # text_files
    paths: list[str] = field(default_factory=list)  # megatron prefixes: one source, their union
    text_field: str = ""
    tfds_data_dir: str = ""
    train_split: str = ""
    eval_split: str = ""
    weight: float = 1.0  # share of the training tokens (normalised over the sources)


@dataclass
class DataConfig:
    dataset: str = SYNTHETIC  # synthetic | python_docs | text_files | any TFDS dataset name
    seq_len: int = 128
    # synthetic: the mean length of its documents, packed several to a row with segment ids
    # as real text is (for measuring what packed rows cost); 0: one sequence per row
    synthetic_document_tokens: int = 0
    # text_files: glob(s), comma-separated, of .txt, .jsonl(.gz|.zst), .parquet files, folders
    files: str = ""
    paths: list[str] = field(default_factory=list)  # megatron: .bin/.idx prefixes
    weights: list[float] = field(default_factory=list)  # megatron: token shares; empty: equal
    text_field: str = "text"  # the feature (TFDS) or JSON key (jsonl) that holds the text
    validation_fraction: float = 0.05  # local text: share of documents held out, by hash
    cache_dir: str = "data_cache"  # built datasets, corpora, trained tokenizers, statistics
    tfds_data_dir: str = ""  # registered TFDS datasets: their data_dir (e.g. gs://...)
    train_split: str = "train"
    eval_split: str = "validation"
    tokenizer: str = ""  # a sentencepiece .model or HF tokenizer.json; empty: train one
    tokenizer_vocab_size: int = 0  # when training one; 0: model.vocab_size
    add_bos: bool = True
    add_eos: bool = True
    prefetch: int = 4  # batches prepared ahead by a background thread
    read_threads: int = 2  # threads reading (and tokenizing) documents ahead of packing
    # A bad record (a JSON line that is not an object or lacks the text field, text that is
    # not UTF-8, a null in a table): false refuses the corpus naming it; true skips and counts.
    skip_bad_records: bool = False
    # Read the token ids `prepare-data` wrote (data/token_cache.py) when every file of a
    # source has them; false: always tokenize text as it trains.
    token_cache: bool = True
    num_workers: int = 2  # prepare-data: tokenizing processes (0: in the calling process)
    # Several named sources mixed by token share; when set, `dataset`/`files`/`paths` above
    # are not read (data/mixture.py).
    sources: list[SourceConfig] = field(default_factory=list)


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8
    microbatches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 4
    # lm-evaluation-harness tasks run on the live parameters (harness.py; the eval extra),
    # every `eval_tasks_every` steps (0: at the end only), `eval_tasks_limit` documents each
    # (0: all), local task definitions from `eval_tasks_include_path`.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0
    eval_tasks_limit: int = 0
    eval_tasks_include_path: str = ""
    z_loss: float = 0.0
    fused_loss: bool = True  # the LM head and the loss as one custom VJP (loss.py)
    # Loss scaling (precision.py): auto is dynamic under float16 compute, none otherwise; a
    # number is a fixed scale. The settings below are DeepSpeed's (GPT-NeoX's fp16 configs).
    loss_scale: str = "auto"
    loss_scale_init: float = 4096.0  # 2^12, GPT-NeoX's initial_scale_power: 12
    loss_scale_window: int = 1000  # good steps before the scale doubles
    loss_scale_hysteresis: int = 2  # overflows tolerated before the scale starts halving
    loss_scale_min: float = 1.0
    # A step whose loss or gradients are not finite (and that the loss scale does not absorb):
    # auto is skip under float16, stop otherwise.
    on_nonfinite: NonFinitePolicy = "auto"
    max_rollbacks: int = 3
    profile_start: int = 3
    profile_steps: int = 0  # 0: no profiler trace
    # The hang watchdog (watchdog.py): null is 20 x the median step time, at least 600 s;
    # 0 is off. The first step and evaluation of a session (compiling) get at least 1800 s.
    step_timeout_s: float | None = None
    # JAX's persistent compilation cache (compile_cache.py): auto is JAX's own setting if made
    # (JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/llama_jax/xla (~/.cache/...); "" is off.
    compilation_cache_dir: str = "auto"


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0: only at the end (SIGTERM/SIGINT also save)
    keep: int = 3  # the newest N checkpoints; 0: all
    keep_every: int = 0
    restore_from: str = ""
    restore_params_only: bool = False


@dataclass
class DistributedConfig:
    # A string, not `Enabled`: `true` arrives from YAML and the command line as a boolean,
    # which `validate` takes as the choice it spells.
    enabled: str = "auto"
    coordinator: str = ""  # host:port of process 0's coordinator
    num_processes: int = 0
    process_id: int = -1
    timeout_s: int = 300  # joining, and noticing a dead peer
    gloo_logs: bool = False  # gloo's per-rank "[Gloo] Rank N is connected ..." lines (CPU)


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A YAML file and, first, the files it names under `base:` (resolved next to it)."""
    if path.is_dir():  # a run directory or an HF folder, named where a YAML file goes
        hint = ""
        if (path / "config.yaml").is_file():
            hint = f" (the run's config is {path / 'config.yaml'})"
        elif (path / "config.json").is_file():
            hint = (" (an HF folder: `llama-jax convert hf-to-orbax` writes it as a run, "
                    "config.yaml included)")
        raise ConfigError(f"{path} is a folder, not a config file{hint}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    layers: list[DictConfig] = []
    for name in [bases] if isinstance(bases, str) else bases:
        layers += _read_yaml(_resolve_base(str(name), path.parent), (*seen, path))
    layers.append(OmegaConf.create(raw))
    return layers


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_base(name: str, here: Path) -> Path:
    for folder in (here, PRESET_DIR):
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(name, preset_names(), n=3)
    hint = f" (did you mean: {', '.join(close)})" if close else ""
    raise ConfigError(f"config base '{name}' not found in {here} or among the presets{hint}")


def resolve_config_path(name: str | Path) -> Path:
    """A YAML file as given or, when no such file exists, the preset of that name."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    preset = PRESET_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if preset.is_file():
        return preset
    close = difflib.get_close_matches(path.stem, preset_names(), n=3)
    hint = f" (presets: {', '.join(close or preset_names())})"
    raise ConfigError(f"config file not found: {path}, and no preset is named '{path.stem}'{hint}")


def _valid_keys(full_key: str) -> list[str]:
    """Names valid beside the unknown `full_key`, for the did-you-mean hint."""
    node: Any = Config
    for part in full_key.split(".")[:-1]:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _one_line(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError | AttributeError) or "not in" in str(e):
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, _valid_keys(key), n=3, cutoff=0.5)
        valid = close or _valid_keys(key)
        hint = f" (closest valid: {', '.join(valid)})" if valid else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    msg = str(e).splitlines()[0]
    wrong = re.match(r"Invalid value (.*), expected one of", msg)
    if wrong and key in _CHOICES:  # a Literal-typed setting, in validate's words
        return ConfigError(f"{source}: {key}={wrong[1]} is not one of: "
                           f"{', '.join(_CHOICES[key])}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- base presets <- the YAML file <- `a.b=value` overrides, validated."""
    merged = OmegaConf.structured(Config)
    layers = _read_yaml(resolve_config_path(path)) if path else []
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _one_line(e, str(path)) from None
    return _finish(_apply(merged, overrides), str(path))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` (e.g. the one saved with a checkpoint) with `a.b=value` overrides, validated."""
    return _finish(_apply(OmegaConf.structured(cfg), overrides), "config")


def _apply(merged: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form a.b=value")
        key, _, value = item.partition("=")
        if not value and isinstance(OmegaConf.select(merged, key), str):
            item = f"{key}=''"  # `a.b=` (the shell ate the quotes of `a.b=""`): empty text
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, f"override '{item}'") from None
    return merged


def _finish(merged: DictConfig, source: str) -> Config:
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _one_line(e, source) from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    target = as_path(path)
    ensure_dir(target.parent)
    replace_text(target, to_yaml(cfg))


def config_from_yaml_text(text: str) -> Config:
    """A resolved config written by `save_config` (checkpoints carry one)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation beyond types


def _literal_fields(node: Any, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """`a.b` -> the values of every setting typed with a Literal, found in the schema."""
    out: dict[str, tuple[str, ...]] = {}
    for name, hint in typing.get_type_hints(node).items():
        if typing.get_origin(hint) is Literal:
            out[f"{prefix}{name}"] = typing.get_args(hint)
        elif dataclasses.is_dataclass(hint):
            out.update(_literal_fields(hint, f"{prefix}{name}."))
    return out


_CHOICES = {**_literal_fields(Config), "distributed.enabled": typing.get_args(Enabled)}

_POSITIVE = (
    "model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
    "model.num_heads", "model.max_position_embeddings", "model.rope_theta", "model.norm_eps",
    "data.seq_len", "train.steps", "train.global_batch_size", "train.microbatches",
    "train.log_every", "train.eval_batches", "train.loss_scale_init", "train.loss_scale_window",
    "train.loss_scale_hysteresis", "train.loss_scale_min", "data.read_threads",
    "model.fp8_amax_history", "distributed.timeout_s", "model.rope_scaling.factor",
    "model.rope_scaling.low_freq_factor", "model.rope_scaling.high_freq_factor",
    "model.rope_scaling.original_max_position_embeddings",
)
_NON_NEGATIVE = (
    "optimizer.lr", "optimizer.warmup_steps", "optimizer.weight_decay", "optimizer.clip_norm",
    "train.eval_every", "train.z_loss", "train.profile_steps", "checkpoint.every",
    "data.tokenizer_vocab_size", "data.prefetch", "data.num_workers",
    "checkpoint.keep_every", "model.init_std", "train.max_rollbacks", "train.eval_tasks_every",
    "train.eval_tasks_limit", "checkpoint.keep", "train.profile_start", "optimizer.eps",
    "distributed.num_processes",
)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(cfg: Config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def validate(cfg: Config) -> None:
    """Refuse impossible settings, naming the key and the value."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        # YAML and the override parser read `true`/`false` as booleans, which a string
        # setting receives as "True"/"False": take them as the choices they spell.
        if isinstance(value, str) and value not in choices and value.lower() in choices:
            value = value.lower()
            _set(cfg, key, value)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be positive")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must not be negative")
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.hidden_size={m.hidden_size}"
        )
    if m.num_kv_heads is not None and (m.num_kv_heads <= 0 or m.num_heads % m.num_kv_heads):
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}"
        )
    if m.head_dim is not None and m.head_dim <= 0:
        raise ConfigError(f"model.head_dim={m.head_dim} must be positive")
    if m.loss_chunks < 0 or (m.loss_chunks and cfg.data.seq_len % m.loss_chunks):
        raise ConfigError(f"model.loss_chunks={m.loss_chunks} must divide data.seq_len="
                          f"{cfg.data.seq_len} (0: chosen from the logits' size)")
    if m.loss_chunks > 1 and not cfg.train.fused_loss:
        raise ConfigError(f"model.loss_chunks={m.loss_chunks} needs train.fused_loss=true (the "
                          f"chunked loss is the fused LM head's)")
    if m.fp8_scaling == "delayed" and m.quantization != "fp8":
        raise ConfigError("model.fp8_scaling=delayed needs model.quantization=fp8 (it scales "
                          "the fp8 matmuls' operands)")
    if m.fp8_head and m.quantization != "fp8":
        raise ConfigError("model.fp8_head=true needs model.quantization=fp8 (it extends the "
                          "block's fp8 recipe to the LM head)")
    if m.attention_block < 0:
        raise ConfigError(f"model.attention_block={m.attention_block} must be >= 0 (0: off)")
    if m.max_segments_per_row < 0 or m.max_segments_per_row == 1:
        raise ConfigError(f"model.max_segments_per_row={m.max_segments_per_row} must be 0 (packed "
                          f"rows never reach cuDNN) or at least 2")
    if not 0.0 < m.rotary_pct <= 1.0:
        raise ConfigError(f"model.rotary_pct={m.rotary_pct} must be in (0, 1]")
    if m.position == "rope" and m.rotary_dim % 2:
        raise ConfigError(
            f"model.rotary_pct={m.rotary_pct} gives an odd rotary width {m.rotary_dim} "
            f"(head_dim {m.head_size}); it must be even"
        )
    r = m.rope_scaling
    if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:  # they bound a ramp
        raise ConfigError(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must "
                          f"exceed model.rope_scaling.low_freq_factor={r.low_freq_factor}")
    if m.position == "learned" and cfg.data.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings} (learned positions)"
        )
    if not 0.0 <= cfg.optimizer.min_lr_ratio <= 1.0:
        raise ConfigError(f"optimizer.min_lr_ratio={cfg.optimizer.min_lr_ratio} must be in [0, 1]")
    if not 0 <= cfg.train.seed < 2**31:  # Grain's shuffles take seeds in [0, 2**32)
        raise ConfigError(f"train.seed={cfg.train.seed} must be in [0, 2**31)")
    for key in ("optimizer.b1", "optimizer.b2"):  # as torch.optim.AdamW checks them
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be in [0, 1)")
    d = cfg.distributed
    if d.process_id < -1 or (d.num_processes and d.process_id >= d.num_processes):
        raise ConfigError(f"distributed.process_id={d.process_id} must be -1 (from the "
                          f"environment) or in [0, distributed.num_processes"
                          f"{f'={d.num_processes}' if d.num_processes else ''})")
    if not 0.0 <= cfg.optimizer.decay_fraction <= 1.0:
        raise ConfigError(
            f"optimizer.decay_fraction={cfg.optimizer.decay_fraction} must be in [0, 1]"
        )
    if not 0.0 < cfg.data.validation_fraction < 1.0:
        raise ConfigError(
            f"data.validation_fraction={cfg.data.validation_fraction} must be in (0, 1)"
        )
    if cfg.data.tokenizer_vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer_vocab_size={cfg.data.tokenizer_vocab_size} exceeds "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    if cfg.data.synthetic_document_tokens < 0:
        raise ConfigError(f"data.synthetic_document_tokens={cfg.data.synthetic_document_tokens} "
                          f"must be >= 0 (0: one sequence per row)")
    if cfg.data.synthetic_document_tokens and (cfg.data.sources
                                               or cfg.data.dataset != SYNTHETIC):
        raise ConfigError("data.synthetic_document_tokens packs synthetic documents: it needs "
                          "data.dataset=synthetic (a corpus's documents are its own)")
    if cfg.data.sources:
        _validate_sources(cfg.data)
    elif cfg.data.dataset == MEGATRON:
        _validate_megatron(cfg.data)
    elif cfg.data.dataset == TEXT_FILES and not cfg.data.files:
        raise ConfigError("data.dataset=text_files needs data.files (a glob of .txt/.jsonl)")
    _validate_loss_scale(cfg.train)
    if cfg.train.step_timeout_s is not None and cfg.train.step_timeout_s < 0:
        raise ConfigError(f"train.step_timeout_s={cfg.train.step_timeout_s} must not be negative "
                          f"(0: no watchdog; null: 20 x the median step time, at least 600 s)")
    if cfg.train.global_batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"train.microbatches={cfg.train.microbatches} does not divide "
            f"train.global_batch_size={cfg.train.global_batch_size}"
        )
    _validate_mesh_section(cfg.mesh)


def _validate_megatron(d: DataConfig) -> None:
    if not d.paths:
        raise ConfigError("data.dataset=megatron needs data.paths (prefixes of .bin/.idx pairs)")
    if d.weights and len(d.weights) != len(d.paths):
        raise ConfigError(f"data.weights has {len(d.weights)} entries for {len(d.paths)} "
                          f"data.paths")
    if d.weights and (min(d.weights) < 0 or sum(d.weights) <= 0):
        raise ConfigError(f"data.weights={list(d.weights)} must be >= 0 with a positive sum")


def _validate_sources(d: DataConfig) -> None:
    names = [s.name for s in d.sources]
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.name:
            raise ConfigError(f"{key}.name is empty: every source needs a name (it labels "
                              f"tokens_by_source and loss_by_source)")
        if s.name in names[:i]:
            raise ConfigError(f"{key}.name={s.name!r} names two sources")
        if not s.dataset or s.dataset == SYNTHETIC:
            raise ConfigError(f"{key}.dataset={s.dataset!r}: name a corpus (text_files, "
                              f"megatron, python_docs or a TFDS dataset), not synthetic tokens")
        if s.dataset == TEXT_FILES and not s.files:
            raise ConfigError(f"{key}: dataset text_files needs files (a glob)")
        if s.dataset == MEGATRON and not s.paths:
            raise ConfigError(f"{key}: dataset megatron needs paths (.bin/.idx prefixes)")
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise ConfigError(f"{key}.weight={s.weight} must be positive")
    pretokenized = {s.name for s in d.sources if kind_of(s.dataset).pretokenized}
    if pretokenized and len(pretokenized) < len(d.sources) and not d.tokenizer:
        raise ConfigError(f"data.sources mixes token ids ({', '.join(sorted(pretokenized))}) "
                          f"with text: set data.tokenizer to the tokenizer those ids come from")


def _validate_loss_scale(t: TrainConfig) -> None:
    value = str(t.loss_scale)
    if value not in LOSS_SCALE_WORDS:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not (math.isfinite(number) and number > 0):
            raise ConfigError(f"train.loss_scale={value} must be one of "
                              f"{', '.join(LOSS_SCALE_WORDS)} or a positive number")
    if not math.isfinite(t.loss_scale_init):
        raise ConfigError(f"train.loss_scale_init={t.loss_scale_init} must be finite")
    if t.loss_scale_min > t.loss_scale_init:
        raise ConfigError(f"train.loss_scale_min={t.loss_scale_min} exceeds "
                          f"train.loss_scale_init={t.loss_scale_init}")


def _validate_mesh_section(mesh: MeshConfig) -> None:
    sizes = {a: getattr(mesh, a) for a in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1")
        if getattr(mesh, f"dcn_{axis}") < 1:
            raise ConfigError(f"mesh.dcn_{axis}={getattr(mesh, f'dcn_{axis}')} must be >= 1")
    filled = [a for a, s in sizes.items() if s == -1]
    if len(filled) > 1:
        names = ", ".join(f"mesh.{a}" for a in filled)
        raise ConfigError(f"only one mesh axis may be -1, got {names}")
    for name, axes in mesh.rules.items():
        if name not in LOGICAL_AXES:
            close = difflib.get_close_matches(name, LOGICAL_AXES, n=3)
            hint = f" (closest valid: {', '.join(close)})" if close else ""
            raise ConfigError(f"mesh.rules: unknown logical axis '{name}'{hint}")
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"mesh.rules.{name}: unknown mesh axis '{axis}' (valid: {', '.join(MESH_AXES)})"
                )
