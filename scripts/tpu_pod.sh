#!/usr/bin/env bash
# Run one llama-jax command on every worker of a TPU VM slice (all hosts run the same program;
# JAX finds the slice's coordinator and process ids from the TPU metadata by itself).
#   usage: scripts/tpu_pod.sh TPU_NAME ZONE PROJECT RUN_DIR -- train configs/llama2-7b.yaml mesh.fsdp=-1
# RUN_DIR should be a path every host sees (a gs:// bucket, or a shared filesystem), so that
# all of them write the same checkpoints. Only the repository's own files travel (what git
# tracks, plus untracked files it does not ignore): never .venv, runs or data_cache. Each
# worker then installs the project with the `tpu` extra (LLAMA_JAX_INSTALL replaces that
# command, e.g. where the workers' image already has it).
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: scripts/tpu_pod.sh TPU_NAME ZONE PROJECT RUN_DIR -- COMMAND [ARGS...]" >&2
  exit 2
fi
name=$1 zone=$2 project=$3 run_dir=$4; shift 4
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
install=${LLAMA_JAX_INSTALL:-"python3 -m pip install -q -e '.[tpu]'"}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# git says which files are the repository's; without it nothing is shipped, rather than all
if ! (cd "$repo" && git ls-files -co --exclude-standard -z > "$stage/files") 2>/dev/null; then
  echo "tpu_pod.sh: $repo: git cannot list the repository's files (git and a git checkout" \
       "are needed: only what git tracks or does not ignore is shipped)" >&2
  exit 1
fi
mkdir "$stage/llama_jax"
(cd "$repo" && xargs -0 cp -P --parents -t "$stage/llama_jax" < "$stage/files")
gcloud compute tpus tpu-vm scp --recurse "$stage/llama_jax" "$name":~/ --worker=all \
  --zone "$zone" --project "$project"
gcloud compute tpus tpu-vm ssh "$name" --worker=all --zone "$zone" --project "$project" \
  --command "cd ~/llama_jax && $install && \
             python3 -m llama_jax.cli $* run_dir=$run_dir distributed.enabled=true"
