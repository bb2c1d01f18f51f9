"""bench-small trained by llama_jax and by HuggingFace transformers (CPU torch), alternating.

The machine's speed drifts within minutes, so only ratios measured in the same run mean
anything: each round times a few steps of ours, then a few of transformers', and the script
reports the median tokens/s of each and their ratio.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_vs_hf.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


def timed_rounds(one_step, steps_per_round: int):  # noqa: ANN001, ANN201
    """A round: one untimed step, then `steps_per_round` timed ones.

    Why the untimed step: the first step after the other system's turn is up to 1.5x slower
    for XLA:CPU (measured: 413-522 tokens/s against 591-657 for the next; torch hardly
    changes), and steady-state throughput is what is compared, as `llama-jax bench` reports.
    """
    def run() -> list[float]:
        one_step()
        times = []
        for _ in range(steps_per_round):
            start = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - start)
        return times

    run()  # warm-up (and compilation)
    return run


def ours(cfg, steps_per_round):  # noqa: ANN001, ANN201
    import jax

    from llama_jax.bench import compiled_random_step
    from llama_jax.train import make_setup

    state, batch, step, _ = compiled_random_step(make_setup(cfg))
    holder = {"state": state}

    def one() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return timed_rounds(one, steps_per_round)


def transformers_llama(cfg, steps_per_round, compile_model):  # noqa: ANN001, ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
        max_position_embeddings=cfg.data.seq_len, rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.b1, cfg.optimizer.b2),
                            weight_decay=cfg.optimizer.weight_decay)
    tokens = torch.randint(0, m.vocab_size, (cfg.train.global_batch_size, cfg.data.seq_len))
    forward = torch.compile(model) if compile_model else model

    def one() -> None:
        loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_rounds(one, steps_per_round)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench-small.yaml"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per system per round")
    parser.add_argument("--compile", action="store_true", help="also torch.compile")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from llama_jax.config import load_config
    from llama_jax.flops import platform_peak_flops

    cfg = load_config(args.config, ["mesh.fsdp=-1", *args.overrides])
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    systems = {"llama_jax": ours(cfg, args.steps),
               "transformers eager": transformers_llama(cfg, args.steps, False)}
    if args.compile:
        systems["transformers torch.compile"] = transformers_llama(cfg, args.steps, True)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, run in systems.items():
            times[name] += run()
        print(f"round {r + 1}: " + "  ".join(
            f"{n} {tokens / statistics.median(t[-args.steps:]):,.0f} tok/s"
            for n, t in times.items()), flush=True)
    peak, source = platform_peak_flops()
    print(f"\njax matmul peak: {peak / 1e9:.0f} GFLOP/s ({source})")
    ours_tps = tokens / statistics.median(times["llama_jax"])
    for name, t in times.items():
        tps = tokens / statistics.median(t)
        print(f"{name:28} {tps:8,.0f} tokens/s (median of {len(t)} steps)   "
              f"llama_jax / this = {ours_tps / tps:.2f}x")


if __name__ == "__main__":
    main()
