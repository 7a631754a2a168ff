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
#   SKIP_BENCH=1 skips the scaling/balance benchmarks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_distributed_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import fbgemm_gpu, torchrec, megatron.core; print('torchrec', torchrec.__version__, 'megatron-core', megatron.core.__version__)"
nvidia-smi -L

# 1. Equivalence: TP=2 and DP=2 on 2 GPUs vs 1 GPU (20 steps), DP=2 checkpoint resume; plus the CPU tests.
python3 -m pytest -q -p no:cacheprovider tests/distributed 2>&1 | tee "$OUT/pytest_distributed.txt"

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  # 2. Weak scaling on the kuairand_1k shape (history 4096, 3 layers, hidden 512, 4 heads x 128), 8 samples/GPU.
  for n in 1 2 4; do
    (( n <= NGPU )) || continue
    torchrun --nproc_per_node "$n" benchmarks/bench_scaling.py --mode scaling --out "$OUT/scaling_${n}gpu.json"
  done
  if (( NGPU >= 2 )); then
    torchrun --nproc_per_node 2 benchmarks/bench_scaling.py --mode scaling --tp 2 --out "$OUT/scaling_tp2.json"
    # 3. Step-time spread across DP ranks, round robin vs Σ L²-balanced batches (long-tailed lengths).
    torchrun --nproc_per_node 2 benchmarks/bench_scaling.py --mode balance --out "$OUT/balance_off.json"
    torchrun --nproc_per_node 2 benchmarks/bench_scaling.py --mode balance --balanced --out "$OUT/balance_on.json"
  fi
fi
echo "results in $OUT"
