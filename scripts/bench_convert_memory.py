"""Peak host memory of `convert hf-to-orbax` against the size of the model and of its shards.

Builds a random HF LLaMA (transformers + CPU torch), saves it in several safetensors shards,
then converts it in a fresh process that first loads everything the conversion uses, so the
growth of its peak RSS during the conversion is the conversion's own memory.

    python scripts/bench_convert_memory.py [--layers 16] [--hidden 256] [--vocab 32000]
        [--shard-mb 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llama_jax.errors import script_main

# Samples the process's anonymous resident memory (what it allocated, not the shard files it
# maps, which the kernel can drop at will) every 5 ms during the conversion.
CHILD = r"""
import json, sys, threading, time
import jax, numpy as np, orbax.checkpoint as ocp, safetensors, tensorstore
from orbax.checkpoint.experimental.v1 import partial
from flax import nnx
from llama_jax import checkpoint, convert, model
jax.devices()
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
before = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
convert.hf_to_orbax(sys.argv[1], sys.argv[2])
done.set()
thread.join()
print(json.dumps({"baseline_bytes": before, "peak_bytes": max(peak[0], anon())}))
"""


def make_hf_model(folder: Path, layers: int, hidden: int, vocab: int, shard_mb: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    hf.save_pretrained(folder, max_shard_size=f"{shard_mb}MB", safe_serialization=True)
    shards = sorted(folder.glob("*.safetensors"))
    return {"params": sum(p.numel() for p in hf.parameters()), "shards": len(shards),
            "largest_shard_bytes": max(s.stat().st_size for s in shards),
            "model_bytes": sum(s.stat().st_size for s in shards)}


def measure(layers: int = 16, hidden: int = 256, vocab: int = 32000, shard_mb: int = 20
            ) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "run"
        figures = make_hf_model(src, layers, hidden, vocab, shard_mb)
        done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)],
                              capture_output=True, text=True, check=False,
                              env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
    figures["growth_bytes"] = figures["peak_bytes"] - figures["baseline_bytes"]
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mb", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    f = measure(a.layers, a.hidden, a.vocab, a.shard_mb)
    if a.json:
        print(json.dumps(f))
        return
    mib = 2**20
    print(f"model: {f['params']:,} parameters in {f['shards']} shards, "
          f"{f['model_bytes'] / mib:.1f} MiB "
          f"(largest shard {f['largest_shard_bytes'] / mib:.1f} MiB)")
    print(f"conversion: peak anonymous memory grew by {f['growth_bytes'] / mib:.1f} MiB over the "
          f"{f['baseline_bytes'] / mib:.0f} MiB of a process with the libraries loaded "
          f"({f['growth_bytes'] / f['model_bytes']:.2f} x the model, "
          f"{f['growth_bytes'] / f['largest_shard_bytes']:.2f} x the largest shard)")


if __name__ == "__main__":
    script_main("bench_convert_memory", main)
