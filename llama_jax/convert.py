"""HuggingFace LLaMA <-> llama_jax: configs and weights.

Our layouts were chosen so that conversion is a transpose and a reshape per tensor (HF
rotate-half RoPE, HF meaning of `intermediate_size`): q/k/v `[N*H, D]` -> `[D, N, H]`,
o `[D, N*H]` -> `[N, H, D]`, MLP and LM head transposed, layers stacked on a leading dim.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax.config import (
    DTYPES,
    ModelConfig,
    RopeScalingConfig,
    load_config,
    save_config,
    validate,
)
from llama_jax.errors import LlamaJaxError
from llama_jax.storage import is_remote


class ConversionError(LlamaJaxError):
    """An HF folder or tensor that cannot be converted."""


# ---------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ConversionError(f"{where}: model_type={hf.get('model_type')!r} "
                              f"architectures={archs}: only LLaMA (LlamaForCausalLM) converts")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; LLaMA uses silu")
    # RoPE settings: top-level rope_theta + rope_scaling (published checkpoints), or the
    # rope_parameters block that transformers 5 writes.
    rope = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or rope
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        rope_scaling = RopeScalingConfig()
    elif kind in ("llama3", "linear"):
        rope_scaling = RopeScalingConfig(
            type=kind, factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", 8192)),
        )
    else:
        raise ConversionError(f"{where}: rope scaling type {kind!r} is not supported "
                              f"(none, linear, llama3)")
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        raise ConversionError(f"{where}: dtype {dtype!r} cannot be represented "
                              f"(float32, bfloat16, float16)")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"), max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_scaling=rope_scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
    if (m.norm, m.activation, m.position, m.parallel_residual, m.rotary_pct) != (
            "rmsnorm", "swiglu", "rope", False, 1.0):
        raise ConversionError("only LLaMA-architecture models (rmsnorm, swiglu, rope, "
                              "sequential residual, full rotary) export to LlamaForCausalLM")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.attention_bias,
        "mlp_bias": m.mlp_bias, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    s = m.rope_scaling
    if s.type != "none":
        cfg["rope_scaling"] = {"rope_type": s.type, "factor": s.factor}
        if s.type == "llama3":
            cfg["rope_scaling"].update(
                low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
    return cfg


# ---------------------------------------------------------------------------------------------
# Tensors


def _layer_map(m: ModelConfig) -> dict[str, tuple[tuple[str, ...], Any]]:
    """HF name inside a layer -> (our path inside `layers`, HF->ours transform)."""
    d, n, k, h = m.hidden_size, m.num_heads, m.kv_heads, m.head_size
    out: dict[str, tuple[tuple[str, ...], Any]] = {
        "self_attn.q_proj.weight": (("attn", "q_proj"), lambda w: w.T.reshape(d, n, h)),
        "self_attn.k_proj.weight": (("attn", "k_proj"), lambda w: w.T.reshape(d, k, h)),
        "self_attn.v_proj.weight": (("attn", "v_proj"), lambda w: w.T.reshape(d, k, h)),
        "self_attn.o_proj.weight": (("attn", "o_proj"), lambda w: w.T.reshape(n, h, d)),
        "mlp.gate_proj.weight": (("mlp", "gate_proj"), lambda w: w.T),
        "mlp.up_proj.weight": (("mlp", "up_proj"), lambda w: w.T),
        "mlp.down_proj.weight": (("mlp", "down_proj"), lambda w: w.T),
        "input_layernorm.weight": (("attn_norm", "scale"), lambda w: w),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda w: w),
    }
    if m.attention_bias:
        out.update({
            "self_attn.q_proj.bias": (("attn", "q_bias"), lambda b: b.reshape(n, h)),
            "self_attn.k_proj.bias": (("attn", "k_bias"), lambda b: b.reshape(k, h)),
            "self_attn.v_proj.bias": (("attn", "v_bias"), lambda b: b.reshape(k, h)),
            "self_attn.o_proj.bias": (("attn", "o_bias"), lambda b: b),
        })
    if m.mlp_bias:
        out.update({
            "mlp.gate_proj.bias": (("mlp", "gate_bias"), lambda b: b),
            "mlp.up_proj.bias": (("mlp", "up_bias"), lambda b: b),
            "mlp.down_proj.bias": (("mlp", "down_bias"), lambda b: b),
        })
    return out


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


Sources = dict[tuple[str, ...], tuple[list[str], Any]]


def _sources(m: ModelConfig) -> Sources:
    """Our parameter path -> (the HF tensors it is made of, one per layer for stacked ones;
    the HF -> ours transform of each)."""
    keep, transpose = (lambda w: w), (lambda w: w.T)
    out: Sources = {("embed",): (["model.embed_tokens.weight"], keep),
                    ("final_norm", "scale"): (["model.norm.weight"], keep)}
    if not m.tie_embeddings:
        out[("lm_head",)] = (["lm_head.weight"], transpose)
    for hf_name, (path, fn) in _layer_map(m).items():
        out[("layers", *path)] = ([f"model.layers.{i}.{hf_name}" for i in range(m.num_layers)],
                                  fn)
    return out


def _tensor_index(hf_dir: Path, m: ModelConfig, sources: Sources) -> dict[str, Path]:
    """Which shard holds each tensor, from the shards' headers alone (no tensor is read). A
    tensor the model has no place for, or one it needs and no shard has, is refused here,
    before a byte is written."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights")
    needed = [name for names, _ in sources.values() for name in names]
    wanted = set(needed)
    if m.tie_embeddings:
        wanted.add("lm_head.weight")  # some tied exports carry it anyway: ignored
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name not in wanted:
                    raise ConversionError(f"{hf_dir}: unexpected tensor {name}")
                index[name] = file
    for name in needed:
        if name not in index:
            raise ConversionError(f"{hf_dir}: missing tensor {name}")
    return index


def _read_leaf(hf_dir: Path, index: dict[str, Path], names: list[str], transform: Any,
               target: Any) -> np.ndarray:
    """One parameter of ours, built from its HF tensors: only this leaf is ever in memory."""
    from safetensors import safe_open

    stacked = names[0].startswith("model.layers.")  # one tensor per layer, stacked on axis 0
    shape = tuple(target.shape[1:] if stacked else target.shape)
    out = np.empty(target.shape, target.dtype)
    for i, name in enumerate(names):
        with safe_open(str(index[name]), framework="flax") as f:
            value = transform(np.asarray(f.get_tensor(name)))
        if tuple(value.shape) != shape:
            raise ConversionError(f"{hf_dir}: tensor {name} has shape {tuple(value.shape)}, "
                                  f"expected {shape} after conversion")
        if stacked:
            out[i] = value
        else:
            out[...] = value
    return out


def params_from_hf(hf_dir: Path, m: ModelConfig, abstract_params: dict[str, Any]
                   ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, array) for each of our parameters, in tree order, one at a time."""
    sources = _sources(m)
    index = _tensor_index(hf_dir, m, sources)
    for key_path, target in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = tuple(k.key for k in key_path)
        yield path, _read_leaf(hf_dir, index, *sources[path], target)


def params_to_hf(params: dict[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters (numpy, stacked) -> HF tensor names and layouts."""
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    if not m.tie_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]).T
    inverse = {
        ("attn", "q_proj"): lambda w: w.reshape(w.shape[0], -1).T,
        ("attn", "k_proj"): lambda w: w.reshape(w.shape[0], -1).T,
        ("attn", "v_proj"): lambda w: w.reshape(w.shape[0], -1).T,
        ("attn", "o_proj"): lambda w: w.reshape(-1, w.shape[-1]).T,
        ("attn", "q_bias"): lambda b: b.reshape(-1),
        ("attn", "k_bias"): lambda b: b.reshape(-1),
        ("attn", "v_bias"): lambda b: b.reshape(-1),
    }
    for hf_name, (path, _) in _layer_map(m).items():
        stacked = np.asarray(_get(params["layers"], path))
        fn = inverse.get(path, lambda w: w.T if w.ndim == 2 else w)
        for i in range(m.num_layers):
            out[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(fn(stacked[i]))
    return out


# ---------------------------------------------------------------------------------------------
# Commands


def _local_output(out_dir: str | Path) -> Path:
    """Conversions write local folders: an object store has no rename to finish them with."""
    if is_remote(out_dir):
        raise ConversionError(f"{out_dir}: conversions write to a local folder; write there and "
                              f"copy it up (gcloud storage cp -r); nothing was changed")
    return Path(out_dir)


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to it when the block succeeds and removed
    when it fails: a conversion leaves either the whole output or nothing, and a retry
    starts clean. An existing, non-empty `out_dir` is never written into."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"{out_dir} already exists and is not empty; choose a new "
                              f"output folder (nothing was changed)")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        print(f"note: removing {tmp}, left by a conversion that did not finish",
              file=sys.stderr)
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, overrides: list[str] = ()) -> Path:
    """Write OUT_DIR as a llama_jax run: config.yaml, checkpoints/0 (parameters only) and the
    tokenizer.model if the HF folder has one."""
    from flax import nnx

    from llama_jax.checkpoint import Checkpointer
    from llama_jax.model import abstract_model

    hf_dir, out_dir = Path(hf_dir), _local_output(out_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_file}: invalid JSON ({e.msg})") from None
    model = model_config_from_hf(hf, str(config_file))
    cfg = load_config(None, [f"run_dir={out_dir}", "mesh.fsdp=-1", *overrides])
    cfg = replace(cfg, model=replace(model, param_dtype="float32"))
    has_tokenizer = (hf_dir / "tokenizer.model").is_file()
    if has_tokenizer:
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(out_dir / "tokenizer.model")))
    validate(cfg)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model)))
    with staged(out_dir) as tmp:
        if has_tokenizer:
            shutil.copyfile(hf_dir / "tokenizer.model", tmp / "tokenizer.model")
        leaves = params_from_hf(hf_dir, cfg.model, abstract)
        ckpt = Checkpointer(cfg, tmp / "checkpoints")
        ckpt.save_params_streamed(0, leaves)
        ckpt.close()
        save_config(cfg, tmp / "config.yaml")
    return out_dir


def orbax_to_hf(path: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    from safetensors.numpy import save_file

    from llama_jax.evaluate import load_for_inference

    out_dir = _local_output(out_dir)
    loaded = load_for_inference(path, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
                                       "mesh.sequence=1"], step=step)
    hf_cfg = hf_config_from_model(loaded.cfg.model)
    tensors = params_to_hf(jax.device_get(loaded.params), loaded.cfg.model)
    with staged(out_dir) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if loaded.tokenizer is not None:  # the run's own, local or on an object store
            (tmp / "tokenizer.model").write_bytes(loaded.tokenizer.path.read_bytes())
    return out_dir


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "checkpoints").is_dir()
