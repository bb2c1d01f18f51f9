"""Interleaved A/B of training-step variants, one worker process per variant.

The machine's speed drifts within minutes, so a change is judged only against a baseline
timed in the same rounds: each round asks every worker for one untimed and `--steps` timed
steps in turn, and the script prints each variant's median tokens/s.

A variant is one quoted string of tokens:
  NAME=VALUE   an environment variable for that worker (upper-case NAME), e.g.
               XLA_FLAGS=--xla_force_host_platform_device_count=8
  a directory  the llama_jax checkout to import (default: this one), e.g. a `git worktree`
               of the previous commit
  anything else  a config override, e.g. model.remat=none

    python scripts/ab_bench.py "" "model.remat=none"
    git worktree add /tmp/base HEAD~1
    python scripts/ab_bench.py "/tmp/base" "" --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_jax.errors import script_main

ROOT = Path(__file__).resolve().parent.parent


def worker(config: str, overrides: list[str]) -> None:
    """Compile the step, then answer each line "N" on stdin with N step times."""
    import jax

    from llama_jax.bench import compiled_random_step
    from llama_jax.config import load_config

    try:
        from llama_jax.step import make_setup
    except ImportError:  # a checkout from before step.py (A/B against an older commit)
        from llama_jax.train import make_setup

    cfg = load_config(config, overrides)
    state, batch, step, _ = compiled_random_step(make_setup(cfg))
    tokens = cfg.train.global_batch_size * cfg.data.seq_len

    def one() -> float:
        nonlocal state
        state, metrics = step(state, batch)
        return float(jax.block_until_ready(metrics["loss"]))

    loss = one()
    print(f"{tokens} {loss}", flush=True)
    for line in sys.stdin:
        one()
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            one()
            times.append(time.perf_counter() - start)
        print(" ".join(f"{t:.6f}" for t in times), flush=True)


def parse(variant: str) -> tuple[dict[str, str], str, list[str]]:
    env, root, overrides = {}, str(ROOT), []
    for token in variant.split():
        name, _, value = token.partition("=")
        if value and name.isupper():
            env[name] = value
        elif Path(token).is_dir():
            root = str(Path(token).resolve())
        else:
            overrides.append(token)
    return env, root, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='quoted variants; "" is the plain default')
    parser.add_argument("--config", default="configs/bench-small.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    args = parser.parse_args()

    workers = []
    for variant in args.variants:
        env, root, overrides = parse(variant)
        env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", **env}
        cmd = [sys.executable, __file__, "--worker", root, str(Path(root) / args.config),
               *overrides]
        workers.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, **env}, cwd=root))
    tokens = []
    for variant, proc in zip(args.variants, workers, strict=True):
        n, loss = proc.stdout.readline().split()
        tokens.append(int(n))
        print(f"compiled {variant or '(default)'}: first loss {float(loss):.6f}", flush=True)
    times: list[list[float]] = [[] for _ in workers]
    for r in range(args.rounds):
        for i, proc in enumerate(workers):
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            times[i] += [float(t) for t in proc.stdout.readline().split()]
        print(f"round {r + 1}: " + "  ".join(
            f"{tokens[i] / statistics.median(t[-args.steps:]):,.0f}"
            for i, t in enumerate(times)), flush=True)
    for proc in workers:
        proc.stdin.close()
        proc.wait()
    print()
    for variant, n, t in zip(args.variants, tokens, times, strict=True):
        print(f"{n / statistics.median(t):8,.0f} tokens/s (median of {len(t)} steps)  "
              f"{variant or '(default)'}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, sys.argv[2])
        worker(sys.argv[3], sys.argv[4:])
    else:
        script_main("ab_bench", main)
