"""Cold against warm starts: what the persistent compilation cache saves a restart.

1. `llama-jax train CONFIG`: a fresh start, then two restarts of that run, each stopped by
   SIGTERM after its first step; the first restart with an empty compilation cache, the
   second with the cache the first filled: seconds from the start of the process to the
   beginning and to the end of its first step (goodput's `ready_s` and `first_step_s`), and
   the command's wall time including the checkpoint saved on SIGTERM.
   A first step begins once its program is compiled (or loaded) and its batch is at hand;
   it ends one step's compute later, which no cache shortens (1.8 s for `default` here).
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
import signal
import subprocess
import sys
import time
from pathlib import Path

from llama_jax.errors import script_main

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_restart: `llama-jax {' '.join(args)}` failed: "
                 f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done, time.time() - start


def _until_first_step(args: list[str], env: dict[str, str], run_dir: Path, session: int
                      ) -> tuple[str, tuple[float, float], float]:
    """Start `llama-jax ARGS`, SIGTERM it once session `session` has logged its first step;
    what it said of its train step, when its first step began and ended (`ready_s`,
    `first_step_s`), and its wall time."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while first is None and proc.poll() is None:
        time.sleep(0.2)
        metrics = run_dir / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line being written
            if row.get("kind") == "goodput" and row["session"] == session:
                first = row["ready_s"], row["first_step_s"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    if first is None:
        sys.exit(f"bench_restart: `llama-jax {' '.join(args)}` ended before its first step: "
                 f"{(err.strip().splitlines() or ['?'])[-1]}")
    said = next((line for line in out.splitlines() if "train step" in line), "")
    return said, first, time.time() - start


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
    # A fresh start, then two restarts of the same run (each stopped by SIGTERM, as a
    # preemption would, once its first step is done): the first restart with an empty cache,
    # the second with the cache the first filled. Only their compilation differs.
    runs = (("fresh start", "xla-fresh"), ("restart, cold cache", "xla"),
            ("restart, warm cache", "xla"))
    for session, (kind, cache) in enumerate(runs, start=1):
        said, first, wall = _until_first_step(
            ["train", args.config, f"run_dir={out / 'run'}", "train.steps=100000",
             "train.log_every=1", f"train.compilation_cache_dir={out / cache}"], env,
            out / "run", session)
        rows.append((f"train {args.config}", kind, first, wall, said))
    bench_env = {**env, "JAX_COMPILATION_CACHE_DIR": str(out / "xla-bench")}
    for kind in ("cold cache", "warm cache"):
        done, wall = _run(["bench", args.compile_config, "--compile-only", "--json",
                           *args.compile_overrides.split()], bench_env)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((f"bench {args.compile_config} --compile-only", kind,
                     (result["compile_s"], None), wall, ""))

    # train rows: when the first step began and ended; bench rows: the compile seconds
    print(f"{'command':44} {'start':20} {'began/compiled s':>16} {'ended s':>7} {'wall s':>7}")
    for command, kind, (began, ended), wall, _ in rows:
        ended_s = "" if ended is None else f"{ended:.1f}"
        print(f"{command:44} {kind:20} {began:16.1f} {ended_s:>7} {wall:7.1f}")
    cold, warm = rows[1][2], rows[2][2]
    print(f"train {args.config}: with a warm cache the first step began "
          f"{cold[0] / warm[0]:.1f}x sooner and ended {cold[1] / warm[1]:.1f}x sooner")
    print(f"bench {args.compile_config} --compile-only: compiled "
          f"{rows[3][2][0] / rows[4][2][0]:.1f}x sooner with a warm cache")
    print(f"warm restart said: {rows[2][4].strip()}")


if __name__ == "__main__":
    script_main("bench_restart", main)
