"""bench-small trained by llama_jax and by HuggingFace transformers (CPU torch), alternating.

The machine's speed drifts within minutes, so only ratios measured in the same run mean
anything: each round times a few steps of ours, then a few of transformers', and the script
reports the median tokens/s of each and their ratio.

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python scripts/bench_vs_hf.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from llama_jax.errors import script_main  # noqa: E402

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
    from llama_jax.step import make_setup

    state, batch, step, _ = compiled_random_step(make_setup(cfg))
    holder = {"state": state}

    def one() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return timed_rounds(one, steps_per_round)


def transformers_llama(cfg, steps_per_round, compile_model, device="cpu",  # noqa: ANN001, ANN201
                       microbatches=1):
    """transformers' LlamaForCausalLM on the config's shapes, trained as its users do: fp32
    parameters with bf16 autocast when the config computes in bf16, SDPA attention, AdamW
    (fused on CUDA), gradient clipping, optionally `torch.compile`; the batch's rows in
    `microbatches` equal parts with their gradients accumulated (every row is all targets,
    so the mean of the parts' mean losses is the batch's). Runs its warm-up step here, so a
    batch that does not fit fails here (`fitted_transformers_llama`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
        head_dim=m.head_size, max_position_embeddings=cfg.data.seq_len,
        rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.b1, cfg.optimizer.b2),
                            weight_decay=cfg.optimizer.weight_decay, fused=device == "cuda")
    tokens = torch.randint(0, m.vocab_size, (cfg.train.global_batch_size, cfg.data.seq_len),
                           device=device)
    forward = torch.compile(model) if compile_model else model
    autocast = m.compute_dtype == "bfloat16"

    def one() -> None:
        for part in tokens.chunk(microbatches):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(input_ids=part, labels=part).loss / microbatches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return timed_rounds(one, steps_per_round)


def fitted_transformers_llama(cfg, steps_per_round, compile_model, device="cpu"):  # noqa: ANN001, ANN201
    """`transformers_llama` in the fewest equal microbatches whose step fits the device's
    memory (1, 2, 4, ... parts of the batch): transformers keeps every activation and the
    float32 logits, so the batch llama_jax runs whole (e.g. 16 x 2048 on an 80 GB H100) can
    run out of memory there; accumulating is what its users then do. Returns the timed
    rounds and the number of parts."""
    import gc

    import torch

    rows = cfg.train.global_batch_size
    parts = 1
    while True:
        try:
            return transformers_llama(cfg, steps_per_round, compile_model, device, parts), parts
        except torch.OutOfMemoryError:
            if parts * 2 > rows or rows % (parts * 2):
                raise
        if compile_model:  # else the next shape compiles as a dynamic-batch graph
            torch._dynamo.reset()
        gc.collect()  # outside the handler: the traceback no longer holds the failed step
        if device == "cuda":
            torch.cuda.empty_cache()
        parts *= 2
        print(f"transformers: out of memory at {rows // (parts // 2)} rows a step; "
              f"trying {parts} microbatches of {rows // parts}", file=sys.stderr)


SYSTEMS = ("llama_jax", "eager", "compile")
NAMES = {"llama_jax": "llama_jax", "eager": "transformers eager",
         "compile": "transformers torch.compile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench-small.yaml"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per system per round")
    parser.add_argument("--compile", action="store_true", help="also torch.compile")
    parser.add_argument("--systems", default="",
                        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: "
                             "llama_jax,eager, plus compile with --compile)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--json", action="store_true", help="one JSON line per system")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from llama_jax.config import load_config
    from llama_jax.flops import flops_per_token, mfu, platform_peak_flops

    chosen = (args.systems.split(",") if args.systems
              else ["llama_jax", "eager", *(["compile"] if args.compile else [])])
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    cfg = load_config(args.config, ["mesh.fsdp=-1", *args.overrides])
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    systems, parts_of = {}, {}
    for key in chosen:
        if key == "llama_jax":
            systems[NAMES[key]] = ours(cfg, args.steps)
        else:
            run, parts = fitted_transformers_llama(cfg, args.steps, key == "compile",
                                                   args.device)
            rows = cfg.train.global_batch_size
            name = NAMES[key] + (f" ({parts}x{rows // parts} rows)" if parts > 1 else "")
            systems[name], parts_of[name] = run, parts
    times: dict[str, list[float]] = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, run in systems.items():
            times[name] += run()
        print(f"round {r + 1}: " + "  ".join(
            f"{n} {tokens / statistics.median(t[-args.steps:]):,.0f} tok/s"
            for n, t in times.items()), flush=True)
    peak, source = platform_peak_flops()
    print(f"\njax platform peak: {peak / 1e9:.0f} GFLOP/s ({source})")
    first = next(iter(times))
    first_tps = tokens / statistics.median(times[first])
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    for name, t in times.items():
        tps = tokens / statistics.median(t)
        if args.json:
            print(json.dumps({"variant": name, "tokens_per_sec": tps,
                              "step_time_s": statistics.median(t), "mfu": mfu(tps, fpt, peak),
                              "steps": len(t), "microbatches": parts_of.get(name, 1)}))
        else:
            print(f"{name:28} {tps:8,.0f} tokens/s (median of {len(t)} steps)   "
                  f"{first} / this = {first_tps / tps:.2f}x")


if __name__ == "__main__":
    script_main("bench_vs_hf", main)
