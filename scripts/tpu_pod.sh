#!/usr/bin/env bash
# Run one llama-jax command on every worker of a TPU VM slice (all hosts run the same program;
# JAX finds the slice's coordinator and process ids from the TPU metadata by itself).
#   usage: scripts/tpu_pod.sh TPU_NAME ZONE PROJECT RUN_DIR -- train configs/llama2-7b.yaml mesh.fsdp=-1
# RUN_DIR should be a gs:// path so that every host writes checkpoints to the same place; the
# repository is copied to each worker and installed with the `tpu` extra.
set -euo pipefail
name=$1 zone=$2 project=$3 run_dir=$4; shift 4
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/llama_jax --worker=all \
  --zone "$zone" --project "$project"
gcloud compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --project "$project" \
  --command "cd ~/llama_jax && python3 -m pip install -q -e '.[tpu]' && \
             python3 -m llama_jax.cli $* run_dir=$run_dir distributed.enabled=true"
