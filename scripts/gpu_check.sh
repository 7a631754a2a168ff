#!/usr/bin/env bash
# GPU-machine check of the fused HSTU attention kernels: build, CUDA parity tests, compute-sanitizer memcheck +
# racecheck on a small representative subset, benchmark. Logs and results go to $OUT (default ./gpu_check_out):
#   build.log  test.log  sanitizer.log  bench.log  attention_<gpu>.json  attention_<gpu>.png  summary.txt
# Stages: HSTU_GPU_STAGES (default "build test sanitize bench"); per-stage time limits in seconds:
# HSTU_T_BUILD / HSTU_T_TEST / HSTU_T_SANITIZE / HSTU_T_BENCH; HSTU_SANITIZE_TOOLS (default "memcheck racecheck");
# HSTU_BENCH_ARGS (extra benchmark arguments). On the lent machine run it as
#   source .device/wheels/setup.sh && bash scripts/gpu_check.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="${HSTU_GPU_STAGES:-build test sanitize bench}"
export MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
note "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)') nvcc $(nvcc --version | tail -1)"

if has build; then
  t0=$(date +%s)
  timeout "${HSTU_T_BUILD:-300}" env HSTU_FORCE_BUILD=1 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  note "build rc=$rc in $(( $(date +%s) - t0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
  grep -E "ptxas warning|error:|Error" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -c 'import torch; from hstu import _C; print("extension:", _C.build_info())' 2>&1 | tee -a "$SUMMARY"

if has test; then
  t0=$(date +%s)
  timeout "${HSTU_T_TEST:-240}" $PY -m pytest -q -p no:cacheprovider --tb=line -rf --maxfail=40 \
    tests/ops/test_hstu_attention_cuda.py >"$OUT/test.log" 2>&1
  rc=$?
  note "tests rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/test.log")"
  grep -E "^FAILED|Error" "$OUT/test.log" | head -25 | cut -c1-400 | tee -a "$SUMMARY"
fi

if has sanitize; then
  cat >"$OUT/sanitize_case.py" <<'PY'
import torch
from hstu.ops.hstu_attention import cuda
offsets = torch.tensor([0, 0, 1, 70, 200], dtype=torch.int32, device="cuda")
for dim, rab_heads, causal, window, tgt in [(64, 1, True, -1, True), (128, 2, True, 9, False), (256, 0, False, 20, False), (32, 2, True, -1, True)]:
    T, H = 200, 2
    q, k, v = (torch.randn(T, H, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rab = torch.randn(4, rab_heads, 131, 131, device="cuda", dtype=torch.bfloat16) if rab_heads else None
    nt = torch.tensor([0, 1, 7, 20], dtype=torch.int32, device="cuda") if tgt else None
    nc = torch.tensor([0, 0, 3, 4], dtype=torch.int32, device="cuda") if tgt else None
    args = (q, k, v, offsets, 130, 0.125, 130, causal, window, nc, nt, 2, rab)
    out = cuda.forward(*args, 0.0, 0)
    for deterministic in (False, True):  # atomic-dq path, then the split path
        grads = cuda.backward(torch.randn_like(out), *args[:13], rab is not None, 0.0, 0, deterministic)
        assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
torch.cuda.synchronize()
print("sanitize case done")
PY
  t0=$(date +%s)
  : >"$OUT/sanitizer.log"
  for tool in ${HSTU_SANITIZE_TOOLS:-memcheck racecheck}; do
    timeout "${HSTU_T_SANITIZE:-150}" compute-sanitizer --tool $tool --error-exitcode 3 --target-processes all \
      $PY "$OUT/sanitize_case.py" >>"$OUT/sanitizer.log" 2>&1
    note "compute-sanitizer $tool rc=$? ($(grep -c 'ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards' "$OUT/sanitizer.log") clean summaries so far) $(grep -E 'SUMMARY' "$OUT/sanitizer.log" | tail -1)"
  done
  rm -f "$OUT/sanitize_case.py"
fi

if has bench; then
  t0=$(date +%s)
  timeout "${HSTU_T_BENCH:-200}" $PY benchmarks/bench_attention.py --out "$OUT" ${HSTU_BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
  note "bench rc=$? in $(( $(date +%s) - t0 )) s"
  cat "$OUT/bench.log" | grep -v "^wrote" | tee -a "$SUMMARY"
fi
