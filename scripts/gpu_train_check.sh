#!/usr/bin/env bash
# GPU check of the training scripts: on a CUDA machine, runs retrieval and ranking for a few hundred steps on the
# synthetic data (generated on first use into data/) and prints tokens/s, TFLOP/s, seconds per epoch and metrics.
#   bash scripts/gpu_train_check.sh            (STEPS=300 by default; TORCHRUN / PYTHON override the launchers)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
STEPS=${STEPS:-300}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu STEPS=5 dry-runs the script on a CPU machine
OUT=${OUT_DIR:-runs/gpu_train_check}
export PYTHONUNBUFFERED=1
rm -rf "$OUT"

DEVICE=$DEVICE "$PYTHON" - <<'PY'
import os, torch
if os.environ["DEVICE"] == "cpu":
    print("[gpu-check] dry run on CPU")
    raise SystemExit(0)
assert torch.cuda.is_available(), "gpu_train_check.sh needs a CUDA device"
from hstu.ops import extension_available
print(f"[gpu-check] {torch.cuda.get_device_name()} torch {torch.__version__} hstu CUDA extension: {extension_available()}")
PY

launch() {  # name script config [gin params...]
  local name=$1 script=$2 config=$3; shift 3
  local params=(--gin-param TrainerArgs.progress_bar=False --gin-param "TrainerArgs.max_steps=$STEPS"
                --gin-param TrainerArgs.device="'$DEVICE'" --gin-param TrainerArgs.log_interval_steps=20)
  for p in "$@"; do params+=(--gin-param "$p"); done
  echo "[gpu-check] === $name ($config) ==="
  "$TORCHRUN" --nproc_per_node 1 --master_addr localhost --master_port 6000 "training/$script" \
    --gin-config-file "configs/$config" --run-dir "$OUT/$name" "${params[@]}"
}

SYNTH=("DatasetArgs.dataset_dir='data/synthetic'" "DatasetArgs.dataset_name='synthetic'" "DatasetArgs.prepare_if_missing=True")
# 1. The paper's ML-1M recipe on the ML-1M-sized synthetic data (d=50: the attention runs the PyTorch reference).
launch retrieval_ml1m_recipe pretrain_gr_retrieval.py ml1m_retrieval.gin "${SYNTH[@]}" "RetrievalArgs.filter_seen_items=False" \
  "TrainerArgs.profile_steps=${PROFILE_STEPS:-20}"
# 2. A kernel-shaped retrieval model (4 heads x 64, bf16) on the same data.
launch retrieval_kernel_shape pretrain_gr_retrieval.py synthetic_retrieval.gin "DatasetArgs.max_seqlen=200" \
  "NetworkArgs.hidden_dim=256" "NetworkArgs.num_heads=4" "NetworkArgs.qk_dim=64" "NetworkArgs.v_dim=64" \
  "TrainerArgs.bf16=True" "TrainerArgs.max_epochs=100" "TrainerArgs.eval_every_epochs=0"
# 3. Ranking: the seed's MovieLens ranking shape (1 layer, 4 heads x 128, 20 candidates) on synthetic bitmask data.
launch ranking_seed_shape pretrain_gr_ranking.py synthetic_ranking.gin "DatasetArgs.max_seqlen=200" \
  "DatasetArgs.num_candidates=20" "NetworkArgs.hidden_dim=128" "NetworkArgs.num_heads=4" "NetworkArgs.qk_dim=128" \
  "NetworkArgs.v_dim=128" "TrainerArgs.bf16=True" "TrainerArgs.max_epochs=100" "TrainerArgs.eval_every_epochs=0"

"$PYTHON" - "$OUT" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
print("\n[gpu-check] summary (median over logging windows after the first):")
print(f"{'run':<26}{'steps':>7}{'tokens/s':>14}{'TFLOP/s':>10}{'s/epoch*':>10}  final metrics")
for name in sorted(os.listdir(out)):
    rows = [json.loads(l) for l in open(os.path.join(out, name, "train_log.jsonl")) if l.strip()]
    windows = [r for r in rows if "tokens_per_s" in r][1:] or [r for r in rows if "tokens_per_s" in r]
    tps = statistics.median(r["tokens_per_s"] for r in windows)
    tflops = statistics.median(r.get("tflops", 0.0) for r in windows)
    config = json.load(open(os.path.join(out, name, "config.json")))
    summary = json.load(open(os.path.join(out, name, "summary.json")))
    # Seconds per epoch of the ML-1M-sized data at this speed (6,040 users x ~163 events), plus one evaluation.
    tokens_per_epoch = 6040 * min(163, config["dataset"]["max_seqlen"])
    epoch_s = tokens_per_epoch / tps + summary.get("eval_seconds", 0.0)
    metrics = {k: round(v, 4) for k, v in summary.items() if k.startswith(("HR@10", "NDCG@10", "AUC/click", "AUC/like"))}
    print(f"{name:<26}{rows[-1]['step']:>7}{tps:>14,.0f}{tflops:>10.2f}{epoch_s:>10.2f}  {metrics}")
print("* s/epoch: one pass over ML-1M-sized data at the measured speed + one full evaluation")
PY
for profile in "$OUT"/*/profile.txt; do  # (none with PROFILE_STEPS=0: the unmatched glob is skipped)
  if [[ -f $profile ]]; then echo "[gpu-check] $profile"; head -n 40 "$profile"; fi
done
