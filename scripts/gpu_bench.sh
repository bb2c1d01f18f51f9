#!/usr/bin/env bash
# GPU benchmark, one command of at most ~8 minutes: `llama-jax bench` on Llama 3.2 1B shapes,
# bf16 compute (fp32 params), seq 2048, one GPU, cuDNN attention, several remat policies.
# Prints one JSON line per variant and a summary table last.
#   usage: scripts/gpu_bench.sh [OUT_DIR]
# Needs jax with CUDA, flax, optax, orbax-checkpoint and omegaconf importable; a folder
# `.gpu_deps` in the repo root, if present, is put on PYTHONPATH (for omegaconf). If the smoke
# test fails with the machine's own flax/optax, the wheels in `.whl` (the versions CI tests,
# pure Python) are installed into a scratch folder and it is tried once more.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
versions() {
  $PY -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
}
# A seconds-long smoke test first, so an import or API problem costs seconds, not minutes.
smoke() { timeout 120 $PY -m llama_jax.cli bench configs/tiny.yaml mesh.fsdp=1 --steps 2 --json; }
versions
if ! smoke; then
  [ -d .whl ] || exit 1
  echo "== smoke test failed with this machine's packages; trying the wheels in .whl"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/llama_jax_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/llama_jax_site:$PYTHONPATH"
  versions
  smoke || exit 1
fi

# cuDNN attention is GPU-only, so CI never runs it: check it against the XLA path and for
# causality before timing it.
timeout 90 $PY scripts/gpu_checks.py cudnn || exit 1

base=(configs/llama3.2-1b.yaml model.compute_dtype=bfloat16 data.seq_len=2048 mesh.fsdp=1)
run() {  # name, then overrides
  local name=$1; shift
  echo "== $name: $*"
  timeout 110 $PY -m llama_jax.cli bench "${base[@]}" "$@" --steps 8 --json \
    | tail -n 1 | sed "s/^{/{\"variant\": \"$name\", /" | tee -a "$out/gpu_bench.jsonl"
}
# Best first (H200, 2026-11-27: 45.8% MFU); see docs/performance.md for the others tried.
run cudnn-dots-b16 model.attention=cudnn model.remat=dots_with_no_batch_dims_saveable train.global_batch_size=16
run cudnn-remat-none-b8 model.attention=cudnn model.remat=none train.global_batch_size=8
run cudnn-dots_saveable-b16 model.attention=cudnn model.remat=dots_saveable train.global_batch_size=16
# XLA attention materialises [batch, heads, T, T] scores: with remat none they are kept for
# every layer (64 GiB at batch 8 -- it did not fit), so compare it under the dots policy.
run xla-dots-b8 model.attention=xla model.remat=dots_with_no_batch_dims_saveable train.global_batch_size=8

$PY - "$out/gpu_bench.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'variant':24} {'tokens/s':>10} {'step ms':>9} {'MFU':>6} {'compile s':>9} {'peak GiB':>8}")
for r in rows:
    print(f"{r['variant']:24} {r['tokens_per_sec']:>10,.0f} {r['step_time_s']*1e3:>9.1f} "
          f"{r['mfu']:>6.1%} {r['compile_s']:>9.1f} {r.get('device_peak_gib', float('nan')):>8.1f}")
PYEOF
