#!/usr/bin/env bash
# Distributed checks on the GPU machine (kind nvidia-h100-x2; -x4 for the 4-GPU scaling point). Stages nothing:
# TorchRec sharding on CUDA needs fbgemm-gpu, staged first as in ../shared/device/README.md §3 (four calls on one
# warm machine, the last one ending with this script):
#   call 1  carry [".device/fbgemm1"]   mkdir -p /tmp/stage && cp .device/fbgemm1/* /tmp/stage/
#   call 2  carry [".device/fbgemm2"]   cp .device/fbgemm2/* /tmp/stage/
#   call 3  carry [".device/fbgemm3"]   cp .device/fbgemm3/* /tmp/stage/
#   call 4  carry [".device/wheels", ".device/fbgemm4"]
#           cp .device/fbgemm4/* /tmp/stage/ && source .device/wheels/setup.sh \
#             && bash .device/wheels/fbgemm_assemble.sh && bash scripts/gpu_distributed_check.sh
# (Build the attention extension in the same call first if the fused kernel should run: see README.)
# Writes its results under $OUT (or ./gpu_distributed_out).
#   SKIP_TESTS=1 skips the pytest run, SKIP_BENCH=1 the scaling/balance benchmarks, SKIP_TRAIN=1 the training scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_distributed_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import fbgemm_gpu, torchrec, megatron.core; print('torchrec', torchrec.__version__, 'megatron-core', megatron.core.__version__)"
nvidia-smi -L

# 1. Equivalence on GPUs: TP=2 (+SP, fp32 and bf16) and DP=2 vs 1 GPU, TP=2 x DP=2 on 4 GPUs, DP=2 checkpoint
# resume; both training scripts under torchrun on 2 GPUs. (CI runs the CPU tests; ALL_TESTS=1 adds them here.)
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  selection=(tests/distributed/test_equivalence.py -k gpu)
  [[ "${ALL_TESTS:-0}" == 1 ]] && selection=(tests/distributed)
  { python3 -m pytest -q -p no:cacheprovider "${selection[@]}"
    [[ "${ALL_TESTS:-0}" == 1 ]] || python3 -m pytest -q -p no:cacheprovider tests/distributed/test_training_scripts.py
  } 2>&1 | tee "$OUT/pytest_distributed.txt" || true  # the benchmarks still run
fi

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  # 2. Weak scaling on the kuairand_1k shape (history 4096, 3 layers, hidden 512, 4 heads x 128), 8 samples/GPU.
  for n in 1 2 4; do
    (( n <= NGPU )) || continue
    torchrun --standalone --nproc_per_node "$n" benchmarks/bench_scaling.py --mode scaling --out "$OUT/scaling_${n}gpu.json"
  done
  if (( NGPU >= 2 )); then
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scaling.py --mode scaling --tp 2 --out "$OUT/scaling_tp2.json"
    # 3. Step-time spread across DP ranks, round robin vs Σ L²-balanced batches (long-tailed lengths), with few
    # (8) and more (32) sequences per rank: with few the GPU is not full and time follows the longest sequence.
    for bs in 8 32; do
      torchrun --standalone --nproc_per_node 2 benchmarks/bench_scaling.py --mode balance --batch-size $bs \
        --out "$OUT/balance_off_b$bs.json"
      torchrun --standalone --nproc_per_node 2 benchmarks/bench_scaling.py --mode balance --balanced --batch-size $bs \
        --out "$OUT/balance_on_b$bs.json"
    done
  fi
fi

if [[ "${SKIP_TRAIN:-0}" != 1 ]] && (( NGPU >= 2 )); then
  # 4. Both training scripts on several GPUs. Ranking: the seed's kuairand_1k TP=2 config (history 4096, 100
  # candidates, hidden 512, item table row-wise) on long synthetic bitmask histories: TP2 on 2 GPUs, TP2 x DP2 on 4.
  # Retrieval: DP over all GPUs with the row-wise sharded item table.
  LONG=("DatasetArgs.dataset_dir='data/synthetic_long'" "DatasetArgs.dataset_name='synthetic'"
        "DatasetArgs.prepare_if_missing=True"
        "DatasetArgs.synthetic_options={'actions': 'bitmask', 'num_users': 1200, 'num_items': 50000, 'mean_length': 2500.0, 'max_length': 4300}")
  train() {  # name nproc script config [gin params...]
    local name=$1 nproc=$2 script=$3 config=$4; shift 4
    local params=(--gin-param TrainerArgs.progress_bar=False --gin-param TrainerArgs.log_interval_steps=10)
    for p in "$@"; do params+=(--gin-param "$p"); done
    echo "=== $name: $nproc GPUs, $config ==="
    torchrun --standalone --nproc_per_node "$nproc" "training/$script" \
      --gin-config-file "configs/$config" --run-dir "$OUT/train/$name" "${params[@]}" 2>&1 | tail -n 25
  }
  train ranking_tp2 2 pretrain_gr_ranking.py kuairand_1k_ranking_tp2.gin "${LONG[@]}" TrainerArgs.max_steps=60 \
    TrainerArgs.eval_interval_steps=0 TrainerArgs.eval_max_batches=20
  (( NGPU >= 4 )) && train ranking_tp2_dp2 4 pretrain_gr_ranking.py kuairand_1k_ranking_tp2.gin "${LONG[@]}" \
    TrainerArgs.max_steps=60 TrainerArgs.eval_interval_steps=0 TrainerArgs.eval_max_batches=20
  train retrieval_dp$NGPU "$NGPU" pretrain_gr_retrieval.py synthetic_retrieval_dp2_sharded.gin \
    "DatasetArgs.dataset_dir='data/synthetic'" TrainerArgs.max_epochs=2
  python3 - "$OUT/train" <<'PY'
import json, os, statistics, sys
root = sys.argv[1]
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "train_log.jsonl")
    if not os.path.exists(path):
        print(f"{name}: no train_log.jsonl (failed)"); continue
    rows = [json.loads(l) for l in open(path) if l.strip()]
    windows = [r for r in rows if "tokens_per_s" in r][1:] or [r for r in rows if "tokens_per_s" in r]
    summary = os.path.join(root, name, "summary.json")
    final = json.load(open(summary)) if os.path.exists(summary) else {}
    metrics = {k: round(v, 4) for k, v in final.items() if k.startswith(("HR@10", "NDCG@10", "AUC/click"))}
    print(f"{name}: steps {rows[-1]['step']} loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} "
          f"tokens/s {statistics.median(r['tokens_per_s'] for r in windows):,.0f} "
          f"TFLOP/s/GPU {statistics.median(r.get('tflops', 0) for r in windows):.1f} {metrics}")
PY
fi
echo "results in $OUT"
