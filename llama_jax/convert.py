"""HuggingFace LLaMA and GPT-NeoX <-> llama_jax: configs and weights.

Our layouts were chosen so that conversion is a transpose and a reshape per tensor (HF
rotate-half RoPE, HF meaning of `intermediate_size`): q/k/v `[N*H, D]` -> `[D, N, H]`,
o `[D, N*H]` -> `[N, H, D]`, MLP and LM head transposed, layers stacked on a leading dim.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    Config,
    ModelConfig,
    RopeScalingConfig,
    apply_overrides,
    load_config,
    save_config,
)
from llama_jax.data.tokenizer import load_tokenizer, saved_tokenizer
from llama_jax.errors import LlamaJaxError, first_line
from llama_jax.storage import as_path, failures_named, is_remote


class ConversionError(LlamaJaxError):
    """An HF folder or tensor that cannot be converted."""


# ---------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """Our model settings from an HF config.json: LLaMA (`LlamaForCausalLM`) or GPT-NeoX
    (`GPTNeoXForCausalLM`: Pythia, GPT-NeoX-20B)."""
    archs = hf.get("architectures") or []
    kind = hf.get("model_type")
    known = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
    if kind not in known or (archs and known[kind] not in archs):
        raise ConversionError(f"{where}: model_type={kind!r} architectures={archs}: only LLaMA "
                              f"(LlamaForCausalLM) and GPT-NeoX (GPTNeoXForCausalLM) convert")
    if kind == "gpt_neox":
        return _neox_config_from_hf(hf, where)
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
    _check_dtype(hf, where)
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


def _check_dtype(hf: dict[str, Any], where: str) -> None:
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    if dtype not in DTYPES:
        raise ConversionError(f"{where}: dtype {dtype!r} cannot be represented "
                              f"(float32, bfloat16, float16)")


def _neox_config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    """GPT-NeoX: LayerNorm, exact GELU, partial rotary (rotate-half on the first
    `rotary_pct` of each head), biases everywhere in the MLP, optional parallel residual.
    Rotary settings come from transformers 5's `rope_parameters` or the published configs'
    `rotary_pct` / `rotary_emb_base`."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{where}: hidden_act={hf['hidden_act']!r}; only the exact "
                              f"GELU (gelu) of Pythia and GPT-NeoX-20B converts")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConversionError(f"{where}: rope scaling is not supported for GPT-NeoX models")
    _check_dtype(hf, where)
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_attention_heads"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-5)), activation="gelu",
        rope_theta=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", True)), mlp_bias=True,
    )


def is_neox(m: ModelConfig) -> bool:
    """Whether `m` is GPT-NeoX's architecture in the form GPTNeoXForCausalLM can hold."""
    return (m.norm, m.activation, m.position, m.kv_heads, m.mlp_bias, m.rope_scaling.type,
            m.head_size * m.num_heads) == ("layernorm", "gelu", "rope", m.num_heads, True,
                                           "none", m.hidden_size)


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
    if is_neox(m):
        return _neox_hf_config(m)
    if (m.norm, m.activation, m.position, m.parallel_residual, m.rotary_pct) != (
            "rmsnorm", "swiglu", "rope", False, 1.0):
        raise ConversionError("only LLaMA-architecture models (rmsnorm, swiglu, rope, "
                              "sequential residual, full rotary) export to LlamaForCausalLM, "
                              "and GPT-NeoX ones (layernorm, gelu, rope, MLP biases, no KV "
                              "grouping) to GPTNeoXForCausalLM")
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


def _neox_hf_config(m: ModelConfig) -> dict[str, Any]:
    """Both rotary spellings: `rope_parameters` for transformers 5, `rotary_pct` and
    `rotary_emb_base` for the releases before it."""
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "max_position_embeddings": m.max_position_embeddings,
        "layer_norm_eps": m.norm_eps, "hidden_act": "gelu",
        "use_parallel_residual": m.parallel_residual, "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": m.attention_bias, "rotary_pct": m.rotary_pct,
        "rotary_emb_base": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta,
                            "partial_rotary_factor": m.rotary_pct},
        "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 0,
    }


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
    if is_neox(m):
        return _neox_sources(m)
    keep, transpose = (lambda w: w), (lambda w: w.T)
    out: Sources = {("embed",): (["model.embed_tokens.weight"], keep),
                    ("final_norm", "scale"): (["model.norm.weight"], keep)}
    if not m.tie_embeddings:
        out[("lm_head",)] = (["lm_head.weight"], transpose)
    for hf_name, (path, fn) in _layer_map(m).items():
        out[("layers", *path)] = ([f"model.layers.{i}.{hf_name}" for i in range(m.num_layers)],
                                  fn)
    return out


def _neox_sources(m: ModelConfig) -> Sources:
    """GPT-NeoX's names. Its fused `query_key_value` is laid out per head: rows
    [head, (q, k, v), head_dim], so q, k and v are each one slice of it."""
    d, n, h = m.hidden_size, m.num_heads, m.head_size
    keep, transpose = (lambda w: w), (lambda w: w.T)

    def qkv_weight(j: int) -> Any:
        return lambda w: w.reshape(n, 3, h, d)[:, j].transpose(2, 0, 1)

    def qkv_bias(j: int) -> Any:
        return lambda b: b.reshape(n, 3, h)[:, j]

    layer = {
        ("attn", "q_proj"): ("attention.query_key_value.weight", qkv_weight(0)),
        ("attn", "k_proj"): ("attention.query_key_value.weight", qkv_weight(1)),
        ("attn", "v_proj"): ("attention.query_key_value.weight", qkv_weight(2)),
        ("attn", "o_proj"): ("attention.dense.weight", lambda w: w.T.reshape(n, h, d)),
        ("mlp", "up_proj"): ("mlp.dense_h_to_4h.weight", transpose),
        ("mlp", "up_bias"): ("mlp.dense_h_to_4h.bias", keep),
        ("mlp", "down_proj"): ("mlp.dense_4h_to_h.weight", transpose),
        ("mlp", "down_bias"): ("mlp.dense_4h_to_h.bias", keep),
        ("attn_norm", "scale"): ("input_layernorm.weight", keep),
        ("attn_norm", "bias"): ("input_layernorm.bias", keep),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", keep),
        ("mlp_norm", "bias"): ("post_attention_layernorm.bias", keep),
    }
    if m.attention_bias:
        layer.update({
            ("attn", "q_bias"): ("attention.query_key_value.bias", qkv_bias(0)),
            ("attn", "k_bias"): ("attention.query_key_value.bias", qkv_bias(1)),
            ("attn", "v_bias"): ("attention.query_key_value.bias", qkv_bias(2)),
            ("attn", "o_bias"): ("attention.dense.bias", keep),
        })
    out: Sources = {("embed",): (["gpt_neox.embed_in.weight"], keep),
                    ("final_norm", "scale"): (["gpt_neox.final_layer_norm.weight"], keep),
                    ("final_norm", "bias"): (["gpt_neox.final_layer_norm.bias"], keep)}
    if not m.tie_embeddings:
        out[("lm_head",)] = ([NEOX_HEAD], transpose)
    for path, (hf_name, fn) in layer.items():
        out[("layers", *path)] = (
            [f"gpt_neox.layers.{i}.{hf_name}" for i in range(m.num_layers)], fn)
    return out


NEOX_HEAD = "embed_out.weight"  # what save_pretrained writes; transformers 5 calls it lm_head
# Buffers some exports carry that are not parameters (causal masks, rotary tables).
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


@contextlib.contextmanager
def _shard(file: Path) -> Iterator[Any]:
    """A safetensors shard opened for reading: a torn or foreign file (a download cut short)
    is one line naming it, not the Rust reader's traceback."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="flax") as f:
            yield f
    except SafetensorError as e:
        raise ConversionError(f"{file}: not a readable safetensors file "
                              f"({first_line(e)})") from None


def _tensor_index(hf_dir: Path, m: ModelConfig, sources: Sources
                  ) -> dict[str, tuple[Path, str]]:
    """Which shard holds each tensor, from the shards' headers alone (no tensor is read). A
    tensor the model has no place for, or one it needs and no shard has, is refused here,
    before a byte is written."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights")
    needed = [name for names, _ in sources.values() for name in names]
    wanted = set(needed)
    if m.tie_embeddings:
        wanted.add("lm_head.weight")  # some tied exports carry it anyway: ignored
    index: dict[str, tuple[Path, str]] = {}  # wanted name -> (shard, name stored there)
    for file in files:
        with _shard(file) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith(BUFFER_SUFFIXES):
                    continue
                key = NEOX_HEAD if name == "lm_head.weight" and NEOX_HEAD in wanted else name
                if key not in wanted:
                    raise ConversionError(f"{hf_dir}: unexpected tensor {name}")
                index[key] = (file, name)
    for name in needed:
        if name not in index:
            raise ConversionError(f"{hf_dir}: missing tensor {name}")
    return index


def _read_leaf(hf_dir: Path, index: dict[str, tuple[Path, str]], names: list[str],
               transform: Any, target: Any) -> np.ndarray:
    """One parameter of ours, built from its HF tensors: only this leaf is ever in memory."""
    stacked = ".layers." in names[0]  # one tensor per layer, stacked on axis 0
    shape = tuple(target.shape[1:] if stacked else target.shape)
    out = np.empty(target.shape, target.dtype)
    for i, name in enumerate(names):
        file, stored = index[name]
        with _shard(file) as f:
            value = transform(np.asarray(f.get_tensor(stored)))
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


def read_hf_params(hf_dir: Path, m: ModelConfig, abstract_params: Any) -> Any:
    """Our parameters from an HF folder, straight into the shardings of `abstract_params`
    (ShapeDtypeStructs that carry them), one tensor at a time: nothing is written, and host
    memory holds one parameter beyond what the devices hold."""
    targets, tree = jax.tree.flatten(abstract_params)
    placed = [jax.make_array_from_callback(target.shape, target.sharding,
                                           lambda index, value=value: value[index])
              for (_, value), target in zip(params_from_hf(hf_dir, m, abstract_params), targets,
                                            strict=True)]
    return jax.tree.unflatten(tree, placed)


def params_to_hf(params: dict[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters (numpy, stacked) -> HF tensor names and layouts."""
    if is_neox(m):
        return _neox_params_to_hf(params, m)
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


def _neox_params_to_hf(params: dict[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `_neox_sources`: q, k, v fused back per head."""
    def qkv(layer: dict[str, Any], i: int) -> dict[str, np.ndarray]:
        a = layer["attn"]
        fused = np.stack([np.asarray(a[k][i]) for k in ("q_proj", "k_proj", "v_proj")], 2)
        out = {"weight": fused.transpose(1, 2, 3, 0).reshape(-1, m.hidden_size)}
        if m.attention_bias:
            out["bias"] = np.stack([np.asarray(a[k][i]) for k in ("q_bias", "k_bias",
                                                                   "v_bias")], 1).reshape(-1)
        return out

    out = {"gpt_neox.embed_in.weight": np.asarray(params["embed"]),
           "gpt_neox.final_layer_norm.weight": np.asarray(params["final_norm"]["scale"]),
           "gpt_neox.final_layer_norm.bias": np.asarray(params["final_norm"]["bias"])}
    if not m.tie_embeddings:
        out[NEOX_HEAD] = np.asarray(params["lm_head"]).T
    layers = params["layers"]
    for i in range(m.num_layers):
        pre = f"gpt_neox.layers.{i}."
        for kind, value in qkv(layers, i).items():
            out[f"{pre}attention.query_key_value.{kind}"] = value
        attn, mlp = layers["attn"], layers["mlp"]
        out[f"{pre}attention.dense.weight"] = np.asarray(attn["o_proj"][i]).reshape(
            -1, m.hidden_size).T
        if m.attention_bias:
            out[f"{pre}attention.dense.bias"] = np.asarray(attn["o_bias"][i])
        out[f"{pre}mlp.dense_h_to_4h.weight"] = np.asarray(mlp["up_proj"][i]).T
        out[f"{pre}mlp.dense_h_to_4h.bias"] = np.asarray(mlp["up_bias"][i])
        out[f"{pre}mlp.dense_4h_to_h.weight"] = np.asarray(mlp["down_proj"][i]).T
        out[f"{pre}mlp.dense_4h_to_h.bias"] = np.asarray(mlp["down_bias"][i])
        for ours, hf in (("attn_norm", "input_layernorm"), ("mlp_norm",
                                                           "post_attention_layernorm")):
            out[f"{pre}{hf}.weight"] = np.asarray(layers[ours]["scale"][i])
            out[f"{pre}{hf}.bias"] = np.asarray(layers[ours]["bias"][i])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


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
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} is a file; choose a new output folder (nothing "
                              f"was changed)")
    if out_dir.exists() and any(out_dir.iterdir()):
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
        with failures_named(out_dir):  # a full disk: one line naming the output
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)


def config_for_hf(hf_dir: Path, run_dir: str | Path, tokenizer: Path | None,
                  overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of an HF folder's model: its architecture from config.json, float32
    parameters, all devices on fsdp, BOS before each text where its tokenizer puts one there
    (Llama's do, GPT-NeoX's does not), then `overrides` on top, so a `model.*` override (an
    attention block size, bf16 parameters) changes the model read rather than being lost."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_file}: invalid JSON ({e.msg})") from None
    model = model_config_from_hf(hf, str(config_file))
    cfg = load_config(None, [f"run_dir={run_dir}", "mesh.fsdp=-1"])
    cfg = replace(cfg, model=replace(model, param_dtype="float32"))
    if tokenizer is not None:
        adds_bos = load_tokenizer(tokenizer).adds_bos()
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(tokenizer), add_bos=adds_bos))
    return apply_overrides(cfg, overrides)


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, overrides: list[str] = ()) -> Path:
    """Write OUT_DIR as a llama_jax run: config.yaml, checkpoints/0 (parameters only) and the
    HF folder's tokenizer if it has one."""
    from flax import nnx

    from llama_jax.checkpoint import Checkpointer
    from llama_jax.model import abstract_model

    hf_dir, out_dir = Path(hf_dir), _local_output(out_dir)
    cfg = config_for_hf(hf_dir, out_dir, saved_tokenizer(hf_dir), overrides)
    abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg.model)))
    with staged(out_dir) as tmp:
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
            for name, content in tokenizer.files().items():
                (tmp / name).write_bytes(content)
            cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(
                out_dir / tokenizer.file_name)))
        leaves = params_from_hf(hf_dir, cfg.model, abstract)
        ckpt = Checkpointer(cfg, tmp / "checkpoints")
        ckpt.save_params_streamed(0, leaves)
        ckpt.close()
        save_config(cfg, tmp / "config.yaml")
    return out_dir


def orbax_to_hf(path: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from llama_jax.evaluate import load_for_inference

    out_dir = _local_output(out_dir)
    loaded = load_for_inference(path, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
                                       "mesh.sequence=1"], step=step)
    hf_cfg = hf_config_from_model(loaded.cfg.model)
    tensors = params_to_hf(jax.device_get(loaded.params), loaded.cfg.model)
    with staged(out_dir) as tmp:
        try:
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except SafetensorError as e:  # the Rust writer's I/O errors (a full disk)
            raise ConversionError(f"{out_dir}: model.safetensors could not be written "
                                  f"({first_line(e)}); nothing was kept") from None
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if loaded.tokenizer is not None:  # the run's own, local or on an object store
            for name, content in loaded.tokenizer.hf_files().items():
                (tmp / name).write_bytes(content)
    return out_dir


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "checkpoints").is_dir()


def hf_folder(path: str | os.PathLike) -> Path | None:
    """`path` as an HF folder to read in place, None when it is something else (a run, a
    checkpoint). One on an object store is refused: safetensors reads local files."""
    if is_remote(path):
        if is_hf_folder(as_path(path)):
            raise ConversionError(f"{path}: HF folders are read from a local disk; copy it "
                                  f"down (gcloud storage cp -r) or convert it (convert "
                                  f"hf-to-orbax) first")
        return None
    return Path(path) if is_hf_folder(Path(path)) else None
