#!/usr/bin/env bash
# Before / after check of a kernel-side change on the GPU machine: builds the base tree (.device/base, e.g.
# `git archive dbb67b2 | tar -x -C .device/base`) and this tree, times the benchmark's five issue shapes for both in
# alternating processes (scripts/ab_bench.py), then runs the CUDA parity file and the compute-sanitizer stage of
# scripts/gpu_check.sh on this tree. Results go to $OUT as each stage ends:
#   builds.log  ab_raw.jsonl  ab.txt  test.log  sanitizer.log  summary.txt
#
#   source .device/wheels/setup.sh && bash scripts/gpu_ab.sh [STAGE...]     (carry .device/wheels and .device/base)
#
# STAGES: build (both trees) or build_new (this tree only), bench, test, sanitize; default "build bench test sanitize"
# (~11-13 minutes on an H100 / H200, more than one call may run): split it as "build bench" (~6 min) and then
# "test sanitize" while the machine is warm (the built extensions stay), or "build_new test sanitize" on a fresh one.
# HSTU_AB_ROUNDS (default 3) alternating rounds; HSTU_AB_BASE (default .device/base) the base tree.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_ab_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BASE="$(cd "${HSTU_AB_BASE:-$ROOT/.device/base}" && pwd)"
STAGES="${*:-build bench test sanitize}"
ROUNDS="${HSTU_AB_ROUNDS:-3}"
has() { [[ " $STAGES " == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" HSTU_FORCE_BUILD=1
note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null) stages: $STAGES"

if has build_new && ! has build; then
  t0=$(date +%s)
  MAX_JOBS=16 timeout 400 $PY setup.py build_ext --inplace >"$OUT/builds.log" 2>&1
  rc=$?
  note "build (this tree) rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || { tail -30 "$OUT/builds.log"; exit 1; }
fi

if has build; then
  t0=$(date +%s)
  # both trees at once, 8 jobs each (the machine has 16 cores)
  (cd "$BASE" && MAX_JOBS=8 timeout 400 $PY setup.py build_ext --inplace >"$OUT/build_base.tmp" 2>&1) &
  base_pid=$!
  MAX_JOBS=8 timeout 400 $PY setup.py build_ext --inplace >"$OUT/build_new.tmp" 2>&1
  rc_new=$?
  wait $base_pid
  rc_base=$?
  { echo "### base ($BASE) rc=$rc_base"; tail -30 "$OUT/build_base.tmp"; echo "### new ($ROOT) rc=$rc_new";
    grep -E "ptxas warning|error" "$OUT/build_new.tmp" | head -20; tail -10 "$OUT/build_new.tmp"; } >"$OUT/builds.log"
  rm -f "$OUT/build_base.tmp" "$OUT/build_new.tmp"
  note "build: base rc=$rc_base, new rc=$rc_new in $(( $(date +%s) - t0 )) s"
  [ $rc_base -eq 0 ] && [ $rc_new -eq 0 ] || exit 1
fi

if has bench; then
  t0=$(date +%s)
  : >"$OUT/ab_raw.jsonl"
  for r in $(seq 1 "$ROUNDS"); do
    for tree in base new; do
      dir=$([ $tree = base ] && echo "$BASE" || echo "$ROOT")
      (cd /tmp && timeout 150 $PY "$ROOT/scripts/ab_bench.py" time --tree "$dir" --label "$tree" --round "$r" \
        --out "$OUT/ab_raw.jsonl") >>"$OUT/ab.txt" 2>&1 || note "ab_bench $tree round $r failed (rc=$?)"
    done
  done
  $PY scripts/ab_bench.py compare "$OUT/ab_raw.jsonl" >"$OUT/ab_table.tmp" 2>&1
  note "bench rc=$? in $(( $(date +%s) - t0 )) s"
  cat "$OUT/ab_table.tmp" | tee -a "$OUT/summary.txt" >>"$OUT/ab.txt"
  rm -f "$OUT/ab_table.tmp"
fi

if has test; then
  t0=$(date +%s)
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout "${HSTU_T_TEST:-300}" $PY -m pytest -q -p no:cacheprovider --tb=line -rf --maxfail=40 \
    tests/ops/test_hstu_attention_cuda_*.py >"$OUT/test.log" 2>&1
  note "tests rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/test.log")"
  grep -E "^FAILED|Error" "$OUT/test.log" | head -20 | cut -c1-300 | tee -a "$OUT/summary.txt"
fi

if has sanitize; then
  # gpu_check.sh's sanitizer stage on the extension built above (it rewrites summary.txt: keep ours)
  cp "$OUT/summary.txt" "$OUT/summary.keep"
  HSTU_GPU_STAGES="sanitize" OUT="$OUT" bash scripts/gpu_check.sh >/dev/null 2>&1
  cat "$OUT/summary.keep" "$OUT/summary.txt" >"$OUT/summary.all" && mv "$OUT/summary.all" "$OUT/summary.txt"
  rm -f "$OUT/summary.keep"
  grep -E "compute-sanitizer" "$OUT/summary.txt" | tail -2
fi
