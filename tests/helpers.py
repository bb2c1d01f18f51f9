"""Shared test helpers: running the CLI in a subprocess, building tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

from llama_jax.config import load_config
from llama_jax.data.batch import to_global
from llama_jax.step import gradients, init_state, make_setup

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def jsonl_rows(run_dir) -> list[dict]:
    """Every complete row of a run's metrics.jsonl. A run that is still writing may have a
    last line half written when it is read (a read does not wait for a write to finish):
    only lines that end in a newline are rows yet."""
    import json

    from etils import epath

    *complete, _ = epath.Path(run_dir, "metrics.jsonl").read_text().split("\n")
    return [json.loads(line) for line in complete if line]


def metrics_rows(run_dir) -> list[dict]:
    """metrics.jsonl's rows of steps and evaluations (not the sessions' goodput accounts)."""
    return [row for row in jsonl_rows(run_dir) if row.get("kind") != "goodput"]


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def foreground_job(command: list[str]) -> subprocess.Popen:
    """`command` as a terminal's foreground job: its own process group, and SIGINT handled
    by default (a shell that started this test in the background left it ignored, which a
    child would inherit). No `preexec_fn`: forking a process running JAX's threads warns."""
    import signal

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # exec: SIG_DFL
    try:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, handler)


def ctrl_c_after(line_start: str, *args: str, timeout: float = 600
                 ) -> tuple[int, str, str]:
    """Run the CLI as a terminal's foreground job (its own process group, SIGINT as a shell
    leaves it) and press Ctrl-C (SIGINT to the whole group) once it writes a stderr line
    starting with `line_start`. Returns (exit status, stdout, all of stderr)."""
    import signal
    import threading

    proc = foreground_job([sys.executable, "-m", "llama_jax.cli", *args])
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()  # a full stdout pipe would stall it
    err = []
    for line in proc.stderr:
        err.append(line)
        if line.startswith(line_start):
            os.killpg(proc.pid, signal.SIGINT)
            break
    err.append(proc.stderr.read())
    proc.wait(timeout=timeout)
    reader.join(timeout=60)
    return proc.returncode, "".join(out), "".join(err)


# Tiny-run configs and layouts shared by the training, step and sharding tests.

LAYOUTS = [
    "data=8", "fsdp=8", "data=2,fsdp=4", "fsdp=4,tensor=2", "data=2,tensor=2,fsdp=2",
    "sequence=2,fsdp=4",
]


def layout_overrides(layout: str) -> list[str]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    sizes.update({k: int(v) for k, v in (kv.split("=") for kv in layout.split(","))})
    return [f"mesh.{k}={v}" for k, v in sizes.items()]


def tiny(tmp_path, *overrides):
    return load_config(CONFIGS / "tiny.yaml", [f"run_dir={tmp_path}", *overrides])


def flat_tree(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def grads_and_loss(cfg, batch_np):
    """Gradients and mean loss of a fresh state on one host batch, through the sharded step."""
    setup = make_setup(cfg)
    state = init_state(setup)
    batch = to_global(batch_np, setup.mesh, setup.rules, cfg.train.global_batch_size)
    grads, aux = jax.jit(lambda p, b: gradients(setup, p, b))(state["params"], batch)
    return jax.device_get(grads), float(aux["loss"])


# Reference models from transformers (dev extra): built, perturbed and saved the same way.


def save_hf_model(model, folder):
    """Biases start at zero and norms at one, which would hide a misplaced one: perturb them,
    then write the folder `hf-to-orbax` and `api.load` read."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def assert_matches_transformers(model, folder, vocab: int):
    """`api.load(folder)` against `model`: logits (1e-4, float32) on random tokens, and ten
    greedy tokens after a prompt. Returns our loaded model."""
    import numpy as np
    import torch

    from llama_jax import api

    tokens = np.random.default_rng(0).integers(0, vocab, (2, 24))
    ours = api.load(folder)
    np.testing.assert_allclose(ours.logits(tokens), hf_logits(model, tokens),
                               atol=1e-4, rtol=1e-4)
    prompt = tokens[:1, :6]
    expected = model.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    assert ours.generate([prompt[0].tolist()], max_new_tokens=10)[0] == expected
    return ours


def write_hf_tokenizer(folder: Path, begins_with_bos: bool, vocab_size: int = 700) -> Path:
    """An HF `tokenizer.json` (byte-level BPE, trained with HF tokenizers on Python's own
    documentation) and its tokenizer_config.json, made the way the two common kinds are:
    Llama 3's (`<|begin_of_text|>` put before each text by its post-processor, another token
    for EOS) or GPT-NeoX's (one `<|endoftext|>` for BOS and EOS, nothing added)."""
    import json
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bos, eos = (("<|begin_of_text|>", "<|end_of_text|>") if begins_with_bos else
                ("<|endoftext|>", "<|endoftext|>"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=sorted({bos, eos}),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(topics.values()), trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    tokenizer.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])]) \
        if begins_with_bos else byte_level
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
         "model_max_length": 2048}))
    return folder / "tokenizer.json"
