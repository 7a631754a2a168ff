#!/usr/bin/env bash
# The main job: retrieval training on the built-in synthetic dataset (generated on first use into data/synthetic),
# on CPU or one GPU. Prints HR@10 / NDCG@10 next to a popularity baseline on the same split.
# Bootstraps .venv on its first run. Extra arguments go to the training script (e.g. --gin-param ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# A rerun of the main job starts anew: --fresh moves the previous run (runs/synthetic_retrieval) aside to
# runs/synthetic_retrieval.old-<UTC time>; nothing is deleted. Pass --resume to continue it instead.
reuse=(--fresh)
for arg in "$@"; do
  case $arg in --resume|--fresh) reuse=() ;; esac
done
exec torchrun --nproc_per_node 1 --master_addr localhost --master_port "${MASTER_PORT:-6000}" \
  ./training/pretrain_gr_retrieval.py --gin-config-file ./configs/synthetic_retrieval.gin "${reuse[@]}" "$@"
