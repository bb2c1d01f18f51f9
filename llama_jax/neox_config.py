"""GPT-NeoX YAML configs -> a llama_jax config file.

GPT-NeoX merges several YAML files into one set of arguments and accepts `-` and `_` in key
names interchangeably; this reads them the same way, builds the model NeoX would build (its
vocabulary padding and its `mlp_type: llama` width rule included, so parameter counts agree),
and writes our YAML with every key it did not map listed in one block at the end. A key that
would change the model in a way we cannot build is refused, naming it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from llama_jax.config import Config, load_config, to_yaml
from llama_jax.errors import ConfigError

# Tokenizer files whose size is known, so --vocab-size may be left out.
KNOWN_TOKENIZERS = {"20B_tokenizer": 50277, "gpt2-vocab": 50257}
def _normalised(raw: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def read_neox(paths: list[str | Path]) -> dict[str, Any]:
    """The files merged in order (a later file's key wins), keys with `_` only."""
    merged: dict[str, Any] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"NeoX config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a NeoX config must be a mapping")
        for key, value in _normalised(raw).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}
            merged[key] = value
    return merged


def padded_vocab(vocab: int, divisible_by: int, model_parallel: int) -> int:
    """NeoX's `_vocab_size_with_padding`: up to a multiple of divisible_by x model_parallel."""
    multiple = divisible_by * model_parallel
    return multiple * math.ceil(vocab / multiple)


def llama_width(hidden: int, multiple_of: int = 256) -> int:
    """NeoX's `mlp_type: llama` width when no intermediate size is given: 8/3 of the hidden
    size, rounded up to a multiple of 256 (LLaMA 7B: 4096 -> 11008)."""
    return multiple_of * math.ceil(int(2 * hidden * 4 / 3) / multiple_of)


class _Reader:
    """Takes keys out of the merged NeoX arguments; what is left at the end was not mapped."""

    def __init__(self, neox: dict[str, Any]):
        self.left = dict(neox)

    def take(self, key: str, default: Any = None) -> Any:
        return self.left.pop(key, default)


def overrides_from_neox(neox: dict[str, Any], vocab_size: int | None
                        ) -> tuple[list[str], list[str], dict[str, Any]]:
    """(our `a.b=value` overrides, comment lines, the NeoX keys left unmapped)."""
    r = _Reader(neox)
    out: list[str] = []
    notes: list[str] = []

    # Model shape.
    hidden = int(r.take("hidden_size"))
    heads = int(r.take("num_attention_heads"))
    out += [f"model.hidden_size={hidden}", f"model.num_layers={int(r.take('num_layers'))}",
            f"model.num_heads={heads}"]
    if (kv := r.take("num_kv_heads")) is not None:
        out.append(f"model.num_kv_heads={int(kv)}")
    mlp_type = r.take("mlp_type", "regular")
    activation = r.take("activation", "gelu")
    if mlp_type == "llama" or activation in ("swiglu", "silu"):
        if activation not in ("silu", "swiglu"):
            raise ConfigError(f"NeoX activation={activation!r} with mlp_type={mlp_type!r}: "
                              f"only SwiGLU (silu) is built for LLaMA-style MLPs")
        width = r.take("intermediate_size") or llama_width(hidden)
        out += ["model.activation=swiglu", f"model.intermediate_size={int(width)}"]
    elif activation == "gelu":
        out += ["model.activation=gelu",
                f"model.intermediate_size={int(r.take('intermediate_size') or 4 * hidden)}"]
    else:
        raise ConfigError(f"NeoX activation={activation!r} cannot be built (gelu, silu/swiglu)")
    norm = r.take("norm", "layernorm")
    if norm not in ("layernorm", "rmsnorm"):
        raise ConfigError(f"NeoX norm={norm!r} cannot be built (layernorm, rmsnorm)")
    eps = r.take("rms_norm_epsilon", 1e-8) if norm == "rmsnorm" else r.take(
        "layernorm_epsilon", 1e-5)
    out += [f"model.norm={norm}", f"model.norm_eps={float(eps)}"]
    pos = r.take("pos_emb", "learned")
    if pos not in ("rotary", "learned"):
        raise ConfigError(f"NeoX pos_emb={pos!r} cannot be built (rotary, learned)")
    out.append(f"model.position={'rope' if pos == 'rotary' else 'learned'}")
    out += [f"model.rotary_pct={float(r.take('rotary_pct', 1.0))}",
            f"model.rope_theta={float(r.take('rotary_emb_base', 10000))}",
            f"model.parallel_residual={bool(r.take('gpt_j_residual', False))}".lower(),
            f"model.tie_embeddings={not bool(r.take('no_weight_tying', False))}".lower()]
    if not r.take("use_bias_in_norms", True) and norm == "layernorm":
        raise ConfigError("NeoX use_bias_in_norms=false: LayerNorm without bias cannot be built")
    attn_bias = bool(r.take("use_bias_in_attn_linear", True))
    mlp_bias = bool(r.take("use_bias_in_mlp", True)) and mlp_type != "llama"
    out += [f"model.attention_bias={attn_bias}".lower(), f"model.mlp_bias={mlp_bias}".lower()]
    for pattern in _attention_patterns(r.take("attention_config")):
        if pattern not in ("global", "flash"):  # flash: global attention, fused kernel
            raise ConfigError(f"NeoX attention_config pattern {pattern!r}: only global "
                              f"(full causal) attention is built")
    if r.take("moe_num_experts", 1) not in (None, 1):
        raise ConfigError("NeoX moe_num_experts: mixture-of-experts models cannot be built")
    seq = int(r.take("seq_length", 2048))
    out += [f"data.seq_len={seq}",
            f"model.max_position_embeddings={int(r.take('max_position_embeddings') or seq)}"]

    # Vocabulary: the tokenizer's size, padded as NeoX pads it.
    mp = int(r.take("model_parallel_size", 1))
    divisible = int(r.take("make_vocab_size_divisible_by", 128))
    vocab_file = str(r.take("vocab_file", ""))
    if vocab_size is None:
        vocab_size = next((n for name, n in KNOWN_TOKENIZERS.items() if name in vocab_file),
                          None)
        if vocab_size is None:
            raise ConfigError(f"NeoX vocab_file={vocab_file!r}: give the tokenizer's size "
                              f"with --vocab-size N")
    out.append(f"model.vocab_size={padded_vocab(vocab_size, divisible, mp)}")
    # NeoX's HFTokenizer is an HF tokenizer.json (20B_tokenizer.json): text is read with it.
    tokenizer_type = r.take("tokenizer_type")
    if tokenizer_type == "HFTokenizer" and vocab_file:
        out.append(f"data.tokenizer={vocab_file}")
    elif tokenizer_type is not None:
        r.left["tokenizer_type"] = tokenizer_type  # listed: its files are not read here

    _optimizer(r, out)
    _precision(r, out)
    _data(r, out)
    if (factor := r.take("checkpoint_factor")) is not None:
        out.append(f"checkpoint.every={int(factor)}")

    # Batch: NeoX's global batch is micro x accumulation x data-parallel ranks.
    micro = int(r.take("train_micro_batch_size_per_gpu", 1))
    gas = int(r.take("gradient_accumulation_steps", r.take("gas", 1)))
    batch = r.take("train_batch_size")
    if batch is None:
        batch = micro * gas
        notes.append(f"train.global_batch_size: micro batch {micro} x {gas} accumulation "
                     f"steps; NeoX multiplies it by the data-parallel ranks, so multiply it "
                     f"by your GPU count / (model x pipe parallel)")
    out += [f"train.global_batch_size={int(batch)}", f"train.microbatches={gas}"]

    pipe = int(r.take("pipe_parallel_size", 0) or 0)
    zero = r.take("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    notes.append(f"suggested mesh (NeoX model-parallel {mp}, pipe-parallel {pipe}, ZeRO stage "
                 f"{stage}): mesh.tensor={mp} mesh.fsdp=-1; pipeline stages become FSDP "
                 f"shards here" + ("" if stage else " (ZeRO off: mesh.data=-1 also works)"))
    return out, notes, r.left


def _attention_patterns(config: Any) -> list[str]:
    """NeoX's attention_config: [[["global"], n_layers], ...]."""
    patterns: list[str] = []
    for entry in config or []:
        kinds = entry[0] if isinstance(entry, list | tuple) else entry
        patterns += [str(k) for k in (kinds if isinstance(kinds, list | tuple) else [kinds])]
    return patterns


def _optimizer(r: _Reader, out: list[str]) -> None:
    opt = r.take("optimizer") or {}
    params = opt.get("params", {}) if isinstance(opt, dict) else {}
    kind = str(opt.get("type", "adam")).lower() if isinstance(opt, dict) else "adam"
    if kind not in ("adam", "adamw"):
        raise ConfigError(f"NeoX optimizer type {opt.get('type')!r}: only Adam/AdamW is built")
    lr = float(params.get("lr", 1e-4))
    out.append(f"optimizer.lr={lr}")
    if "betas" in params:
        b1, b2 = params["betas"]
        out += [f"optimizer.b1={float(b1)}", f"optimizer.b2={float(b2)}"]
    if "eps" in params:
        out.append(f"optimizer.eps={float(params['eps'])}")
    if (min_lr := r.take("min_lr")) is not None and lr > 0:
        out.append(f"optimizer.min_lr_ratio={float(min_lr) / lr}")
    style = r.take("lr_decay_style", "linear")
    if style not in ("constant", "cosine", "linear"):
        raise ConfigError(f"NeoX lr_decay_style={style!r} (constant, cosine, linear)")
    out.append(f"optimizer.schedule={style}")
    steps = int(r.take("train_iters", 100))
    out.append(f"train.steps={steps}")
    decay_iters = r.take("lr_decay_iters")
    if decay_iters is not None and int(decay_iters) != steps:  # ours decays over train.steps
        r.left["lr_decay_iters"] = decay_iters
    if (warmup := r.take("warmup")) is not None:  # NeoX: a fraction of the decay iterations
        out.append(f"optimizer.warmup_steps={round(float(warmup) * steps)}")
    if (wd := r.take("weight_decay")) is not None:
        out.append(f"optimizer.weight_decay={float(wd)}")
    if (clip := r.take("gradient_clipping")) is not None:
        out.append(f"optimizer.clip_norm={float(clip)}")


def _data(r: _Reader, out: list[str]) -> None:
    """`data-path` or `train-data-paths` (+ `train-data-weights`) -> megatron token files;
    NeoX's `split` (train,valid,test per mille) -> the validation fraction. Separate
    validation/test paths stay listed: validation here is a slice of each train prefix."""
    paths = r.take("train_data_paths") or ([r.take("data_path")] if "data_path" in r.left
                                           else [])
    if not paths:
        return
    out += ["data.dataset=megatron", f"data.paths=[{','.join(str(p) for p in paths)}]"]
    if (weights := r.take("train_data_weights")) is not None:
        out.append(f"data.weights=[{','.join(str(float(w)) for w in weights)}]")
    if (split := r.take("split")) is not None:
        parts = [float(x) for x in str(split).split(",")]
        if len(parts) > 1 and sum(parts) > 0 and parts[1] > 0:
            out.append(f"data.validation_fraction={parts[1] / sum(parts)}")


def _precision(r: _Reader, out: list[str]) -> None:
    fp16 = r.take("fp16") or {}
    bf16 = r.take("bf16") or {}
    precision = r.take("precision")
    if (isinstance(fp16, dict) and fp16.get("enabled")) or precision == "fp16":
        out.append("model.compute_dtype=float16")
        scale = fp16.get("loss_scale", 0) if isinstance(fp16, dict) else 0
        out.append("train.loss_scale=dynamic" if not scale else f"train.loss_scale={scale}")
        for neox_key, ours, convert in (
                ("initial_scale_power", "loss_scale_init", lambda p: float(2 ** int(p))),
                ("loss_scale_window", "loss_scale_window", int),
                ("hysteresis", "loss_scale_hysteresis", int),
                ("min_loss_scale", "loss_scale_min", float)):
            if isinstance(fp16, dict) and neox_key in fp16:
                out.append(f"train.{ours}={convert(fp16[neox_key])}")
    elif (isinstance(bf16, dict) and bf16.get("enabled")) or precision == "bfloat16":
        out.append("model.compute_dtype=bfloat16")


def convert_neox_config(paths: list[str | Path], out_file: str | Path,
                        vocab_size: int | None = None) -> Config:
    """Write OUT_FILE (our YAML) from GPT-NeoX config files; returns the config it holds."""
    neox = read_neox(paths)
    for key in ("hidden_size", "num_layers", "num_attention_heads"):
        if key not in neox:
            raise ConfigError(f"NeoX config: no {key.replace('_', '-')} in "
                              f"{', '.join(str(p) for p in paths)}")
    overrides, notes, left = overrides_from_neox(neox, vocab_size)
    cfg = load_config(None, [f"run_dir=runs/{Path(out_file).stem}", *overrides])
    out = Path(out_file)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new file (nothing was changed)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such folder")
    lines = [f"# From GPT-NeoX: {', '.join(str(p) for p in paths)}"]
    lines += [f"# {note}" for note in notes]
    if left:
        lines.append("# NeoX keys not carried over:")
        lines += [f"#   {key}: {value!r}" for key, value in sorted(left.items())]
    out.write_text(to_yaml(cfg) + "\n".join(lines) + "\n")
    return cfg
