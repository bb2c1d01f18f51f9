"""`convert neox-config`: GPT-NeoX YAML files (written here in NeoX's own format) give the model
NeoX builds, by published parameter counts, and every key not carried over is listed."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import run_cli, write_hf_tokenizer

from llama_jax import flops
from llama_jax.config import load_config
from llama_jax.errors import ConfigError
from llama_jax.neox_config import convert_neox_config


def pythia(layers: int, hidden: int, heads: int, model_parallel: int = 1) -> dict:
    """The shape of EleutherAI/pythia's models/*.yml, keys spelled with `-` as there."""
    return {
        "pipe-parallel-size": 1, "model-parallel-size": model_parallel,
        "num-layers": layers, "hidden-size": hidden, "num-attention-heads": heads,
        "seq-length": 2048, "max-position-embeddings": 2048, "pos-emb": "rotary",
        "rotary-pct": 0.25, "no-weight-tying": True, "gpt-j-residual": True,
        "output-layer-parallelism": "column", "attention-config": [[["flash"], layers]],
        "scaled-upper-triang-masked-softmax-fusion": True, "bias-gelu-fusion": True,
        "init_method": "small_init", "output_layer_init_method": "wang_init",
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95],
                                                 "eps": 1.0e-8}},
        "min_lr": 0.0001,
        "zero_optimization": {"stage": 1, "allgather_partitions": True},
        "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "weight-decay": 0.01,
        "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
                 "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1},
        "train-iters": 143000, "lr-decay-iters": 143000, "lr-decay-style": "cosine",
        "warmup": 0.01, "checkpoint-factor": 1000,
        "tokenizer-type": "HFTokenizer", "vocab-file": "data/20B_tokenizer.json",
    }


LLAMA_7B = {  # GPT-NeoX's configs/llama/7B.yml
    "pipe_parallel_size": 1, "model_parallel_size": 1, "make_vocab_size_divisible_by": 1,
    "num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "seq_length": 2048,
    "max_position_embeddings": 2048, "pos_emb": "rotary", "rotary_pct": 1,
    "no_weight_tying": True, "gpt_j_residual": False, "output_layer_parallelism": "column",
    "norm": "rmsnorm", "rms_norm_epsilon": 1.0e-6, "use_bias_in_norms": False,
    "use_bias_in_attn_linear": False, "activation": "silu", "mlp_type": "llama",
}


def write(tmp_path, name, settings):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("name, shape, published", [
    ("70m", (6, 512, 8), 70_426_624),
    ("160m", (12, 768, 12), 162_322_944),
    ("410m", (24, 1024, 16), 405_334_016),
    ("1b", (16, 2048, 8), 1_011_781_632),
    ("6.9b", (32, 4096, 32, 2), 6_857_302_016),  # model-parallel 2: vocab padded to 50,432
])
def test_pythia_configs_give_the_published_counts(tmp_path, name, shape, published):
    cfg = convert_neox_config([write(tmp_path, "model.yml", pythia(*shape))],
                              tmp_path / "out.yaml")
    assert flops.count_params(cfg.model).total == published
    assert load_config(tmp_path / "out.yaml").model == cfg.model


def test_blended_data_paths_and_split(tmp_path):
    neox = {**pythia(6, 512, 8), "train-data-paths": ["d/a_text_document", "d/b_text_document"],
            "train-data-weights": [1, 3], "valid-data-paths": ["d/v_text_document"],
            "split": "949,50,1"}
    cfg = convert_neox_config([write(tmp_path, "m.yml", neox)], tmp_path / "out.yaml")
    assert (cfg.data.dataset, cfg.data.paths, cfg.data.weights) == (
        "megatron", ["d/a_text_document", "d/b_text_document"], [1.0, 3.0])
    assert cfg.data.validation_fraction == pytest.approx(0.05)
    assert "#   valid_data_paths:" in (tmp_path / "out.yaml").read_text()


def test_llama_7b_neox_config(tmp_path):
    cfg = convert_neox_config([write(tmp_path, "7B.yml", LLAMA_7B)], tmp_path / "out.yaml",
                              vocab_size=32000)
    assert cfg.model.intermediate_size == 11008  # NeoX's 8/3 rule, rounded up to 256
    assert flops.count_params(cfg.model).total == 6_738_415_616


def test_several_files_merge_and_every_setting_is_mapped_or_listed(tmp_path):
    model = write(tmp_path, "pythia-70m.yml", pythia(6, 512, 8))
    setup = write(tmp_path, "local_setup.yml", {
        "data-path": "data/pile/pile_text_document", "save": "checkpoints",
        "load": "checkpoints", "train_micro_batch_size_per_gpu": 16, "log-interval": 10,
        "wandb_project": "neox"})
    result = run_cli("convert", "neox-config", str(model), str(setup), str(tmp_path / "o.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"wrote {tmp_path / 'o.yaml'} (70,426,624 parameters); "
                                     f"train it with: llama-jax train {tmp_path / 'o.yaml'}")
    cfg = load_config(tmp_path / "o.yaml")
    t, o = cfg.train, cfg.optimizer
    assert (cfg.model.compute_dtype, t.loss_scale, t.loss_scale_init, t.loss_scale_window,
            t.loss_scale_hysteresis, t.loss_scale_min) == ("float16", "dynamic", 4096.0, 1000,
                                                           2, 1.0)
    assert (o.lr, o.b1, o.b2, o.eps, o.min_lr_ratio, o.schedule, o.weight_decay,
            o.clip_norm) == (0.001, 0.9, 0.95, 1e-8, pytest.approx(0.1), "cosine", 0.01, 1.0)
    assert (t.steps, o.warmup_steps, cfg.checkpoint.every) == (143000, 1430, 1000)
    # the later file's micro batch wins: 16 x 2 accumulation steps
    assert (t.global_batch_size, t.microbatches) == (32, 2)
    text = (tmp_path / "o.yaml").read_text()
    listed = text.split("# NeoX keys not carried over:")[1]
    assert (cfg.data.dataset, cfg.data.paths) == ("megatron", ["data/pile/pile_text_document"])
    for key in ("save", "load", "log_interval", "wandb_project",
                "output_layer_parallelism", "init_method", "bias_gelu_fusion"):
        assert f"#   {key}:" in listed, key
    assert "lr_decay_iters" not in listed  # equal to train-iters: what train.steps decays over
    assert "suggested mesh (NeoX model-parallel 1, pipe-parallel 1, ZeRO stage 1)" in text
    info = run_cli("info", str(tmp_path / "o.yaml"), "--json")
    assert json.loads(info.stdout)["params"] == 70_426_624


@pytest.mark.parametrize("change, message", [
    ({"attention-config": [[["sparse_fixed"], 6]]}, "attention_config pattern 'sparse_fixed'"),
    ({"pos-emb": "alibi"}, "pos_emb='alibi' cannot be built"),
    ({"norm": "scalenorm"}, "norm='scalenorm' cannot be built"),
    ({"vocab-file": "my-tokenizer.json"}, "give the tokenizer's size with --vocab-size N"),
])
def test_what_cannot_be_built_is_refused_in_one_line(tmp_path, change, message):
    neox = write(tmp_path, "m.yml", {**pythia(6, 512, 8), **change})
    result = run_cli("convert", "neox-config", str(neox), str(tmp_path / "o.yaml"))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert message in line, line
    assert not (tmp_path / "o.yaml").exists()
    with pytest.raises(ConfigError):
        convert_neox_config([neox], tmp_path / "o2.yaml")


def test_the_printed_train_command_runs(tmp_path):
    """...and NeoX's HFTokenizer `vocab-file` (a tokenizer.json) is the run's tokenizer:
    sampling from text works."""
    vocab_file = write_hf_tokenizer(tmp_path / "tok", begins_with_bos=False)
    small = {**pythia(2, 64, 4), "seq-length": 32, "max-position-embeddings": 32,
             "train-iters": 2, "train_micro_batch_size_per_gpu": 8,
             "gradient_accumulation_steps": 1, "vocab-file": str(vocab_file)}
    out = tmp_path / "small.yaml"
    result = run_cli("convert", "neox-config", str(write(tmp_path, "m.yml", small)), str(out),
                     "--vocab-size", "700")
    assert result.returncode == 0, result.stderr
    assert load_config(out).data.tokenizer == str(vocab_file)
    assert "tokenizer_type" not in out.read_text()
    command = result.stdout.strip().split("train it with: ")[1].split()
    assert command[:2] == ["llama-jax", "train"]
    trained = run_cli(*command[1:], f"run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr
    sampled = run_cli("generate", str(tmp_path / "run"), "--prompt", "def",
                      "--max-new-tokens", "2", "--temperature", "0")
    assert sampled.returncode == 0 and "def" in sampled.stdout, sampled.stderr
