"""Cold against warm starts: what the persistent compilation cache saves a restart.

1. `llama-jax train CONFIG train.steps=1` twice into fresh run directories sharing one new
   compilation cache: seconds from the start of the process to the end of its first step
   (goodput's `first_step_s`) and the whole command's wall time, cold then warm.
2. `llama-jax bench COMPILE_CONFIG --compile-only` twice against another new cache (JAX's own
   JAX_COMPILATION_CACHE_DIR, which bench honours): the step's compile seconds, cold then warm.

    python scripts/bench_restart.py --out /tmp/restart
    python scripts/bench_restart.py --config configs/tiny.yaml --compile-config configs/tiny.yaml

Each run is a separate process, as a restart is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_restart: `llama-jax {' '.join(args)}` failed: "
                 f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done, time.time() - start


def _first_step_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "goodput"][-1]["first_step_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--compile-config", default="configs/llama3.2-1b.yaml")
    p.add_argument("--compile-overrides",
                   default="train.global_batch_size=8 data.seq_len=2048 model.remat=full",
                   help="space-separated overrides for the compile-only bench")
    p.add_argument("--out", default="", help="work folder (default: a new temporary one)")
    args = p.parse_args()
    out = Path(args.out or f"/tmp/bench_restart_{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as `make train`

    rows = []
    for kind in ("cold", "warm"):
        done, wall = _run(["train", args.config, f"run_dir={out / kind}", "train.steps=1",
                           f"train.compilation_cache_dir={out / 'xla'}"], env)
        said = next((line for line in done.stdout.splitlines() if "train step" in line), "")
        rows.append((f"train {args.config}", kind, _first_step_s(out / kind), wall, said))
    bench_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(out / "xla-bench")}
    for kind in ("cold", "warm"):
        done, wall = _run(["bench", args.compile_config, "--compile-only", "--json",
                           *args.compile_overrides.split()], bench_env)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((f"bench {args.compile_config} --compile-only", kind, result["compile_s"],
                     wall, ""))

    print(f"{'command':48} {'start':5} {'first step / compile s':>22} {'wall s':>8}")
    for command, kind, seconds, wall, _ in rows:
        print(f"{command:48} {kind:5} {seconds:22.1f} {wall:8.1f}")
    for i in (0, 2):
        cold, warm = rows[i][2], rows[i + 1][2]
        print(f"{rows[i][0]}: warm {cold / warm:.1f}x sooner" if warm > 0 else "")
    print(f"warm train said: {rows[1][4].strip()}")


if __name__ == "__main__":
    main()
