#!/usr/bin/env bash
# Compile-checks csrc/ with nvcc (object files only, no link, no GPU): the torch binding TU and a representative
# subset of the generated kernel instantiations (every head dim, both dtypes, with and without rab, forward and
# backward), for sm_80 and sm_90a. Uses the CPU torch headers of the venv (plus a stub for the one CUDA-build-only
# header they lack). Set HSTU_COMPILE_CHECK_ALL=1 to compile every instantiation for both architectures.
# The Hopper forward (fwd_kernel_sm90.h) and backward (bwd_kernel_sm90.h): one representative *_sm90.cu unit each,
# for sm_90a only (what setup.py builds them for), and HSTU_WITH_SM90_FWD on every unit so launch.h's sm90 dispatch
# branches (forward and backward) are compiled too. The benchmark-only variants (HSTU_BENCH_VARIANTS) are compiled
# in the two units that have them (bf16 head dim 128 without rab, head dim 256).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "compile_check: nvcc not found; skipping the CUDA compile check" >&2
  exit "${HSTU_REQUIRE_NVCC:-0}"
fi
CUTLASS_INC="${CUTLASS_INCLUDE_DIR:-$("$PY" - <<'PY'
import pathlib
try:
    import cutlass_library
    print(pathlib.Path(cutlass_library.__file__).resolve().parent / "source" / "include")
except ImportError:
    print("")
PY
)}"
if [ -z "$CUTLASS_INC" ] || [ ! -d "$CUTLASS_INC/cute" ]; then
  echo "compile_check: CUTLASS headers not found (pip install nvidia-cutlass or set CUTLASS_INCLUDE_DIR)" >&2
  exit 1
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
TORCH_INC="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()))')"
PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
CUDA_INC="$(dirname "$(dirname "$NVCC")")/include"
JOBS="${JOBS:-$(nproc)}"
COMMON=(-std=c++17 -O3 --expt-relaxed-constexpr --expt-extended-lambda -DHSTU_WITH_SM90_FWD -I"$ROOT/csrc/hstu_attention"
  -I"$CUTLASS_INC")
start=$(date +%s)

# The layer and jagged units, with torch's half-type switches as setup.py's build passes them: one after the other
# in the background while the binding compiles. csrc/layer/uvqk.cu also takes the CUTLASS headers and
# HSTU_WITH_SM90_FWD (its CUTLASS sm90 GEMM: sm_90a device code, a stub for sm_80), as setup.py builds it.
(
  for unit in csrc/jagged/jagged.cu csrc/layer/norm_mul_dropout.cu csrc/layer/uvqk.cu; do
    extra=()
    [ "$unit" = csrc/layer/uvqk.cu ] && extra=(--expt-relaxed-constexpr -DHSTU_WITH_SM90_FWD -DNDEBUG -I"$CUTLASS_INC")
    "$NVCC" -std=c++17 -O3 -x cu -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas=-warn-spills -I"$WORK/stub" $TORCH_INC -I"$PY_INC" -I"$CUDA_INC" \
      ${extra[@]+"${extra[@]}"} -DTORCH_EXTENSION_NAME=_C -w -c "$unit" -o "$WORK/$(basename "$unit" .cu).o" \
      >"$WORK/plain.log" 2>&1 ||
      { echo "[compile_check] FAILED $unit (sm_80 and sm_90a)"; cat "$WORK/plain.log"; exit 1; }
    grep -i "spill" "$WORK/plain.log" | grep -v " 0 bytes spill" | sed "s|^|[compile_check] $(basename "$unit"): |" || true
    echo "[compile_check] ok $unit (sm_80 and sm_90a)"
  done
) &
plain_pid=$!
echo "[compile_check] binding TU (host compiler, torch headers)"
"$NVCC" "${COMMON[@]}" -x cu -gencode=arch=compute_90a,code=sm_90a -I"$WORK/stub" $TORCH_INC -I"$PY_INC" -I"$CUDA_INC" \
  -DTORCH_EXTENSION_NAME=_C -w -c csrc/hstu_attention/hstu_api.cpp -o "$WORK/api.o"
wait "$plain_pid" || exit 1

INST=csrc/hstu_attention/instantiations
if [ "${HSTU_COMPILE_CHECK_ALL:-0}" = "1" ]; then
  mapfile -t FILES < <(ls $INST/*.cu)
  ARCHS=(80 90a)
else
  FILES=(
    $INST/hstu_fwd_bf16_hdim32_norab_sm80.cu
    $INST/hstu_fwd_fp16_hdim64_rab_sm80.cu
    $INST/hstu_fwd_bf16_hdim128_rab_sm80.cu
    $INST/hstu_fwd_bf16_hdim256_norab_sm80.cu
    $INST/hstu_bwd_fp16_hdim32_rab_sm80.cu
    $INST/hstu_bwd_bf16_hdim64_norab_sm80.cu
    $INST/hstu_bwd_bf16_hdim128_rab_sm80.cu
    $INST/hstu_bwd_fp16_hdim256_rab_sm80.cu
  )
  ARCHS=(80)
  # the sm80-style units for sm_90a (the Hopper-only instructions they use: the backward's vector float atomics):
  # one backward unit (the 90a build of every unit: HSTU_COMPILE_CHECK_ALL=1)
  SM90A_SM80_FILES=($INST/hstu_bwd_bf16_hdim128_rab_sm80.cu)
fi
# Host self-check of the sm90 forward's and backward's layout assumptions (fragment orders, swizzled tile addressing,
# the MN-major views of the backward's K-major tiles) for every instantiated (dtype, head dim), and of their grouped
# launch order (tile_scheduler.h): built and run in the background while the kernel units compile.
cat >"$WORK/sm90_layouts.cu" <<'CU'
#include "self_checks.h"
#include <cstdio>
template <typename E, int D, int kWarpGroups = 2>
int check(const char* name) {
  const std::string e = hstu::sm90::check_sm90_traits<hstu::sm90::FwdTraitsSm90<E, D, false, kWarpGroups>>();
  if (!e.empty())
    std::printf("[compile_check] sm90 forward layouts %s hdim%d (%d consumer warpgroups): %s\n", name, D, kWarpGroups,
                e.c_str());
  return e.empty() ? 0 : 1;
}
template <typename E, int D>
int check_bwd(const char* name) {
  const std::string e = hstu::sm90::check_sm90_bwd_traits<hstu::sm90::BwdTraitsSm90<E, D, false>>();
  if (!e.empty()) std::printf("[compile_check] sm90 backward layouts %s hdim%d: %s\n", name, D, e.c_str());
  return e.empty() ? 0 : 1;
}
template <typename E>
int check_bwd_split(const char* name) {
  const std::string e = hstu::sm90::check_sm90_bwd_split_traits<hstu::sm90::BwdTraitsSm90Split<E, false>>();
  if (!e.empty()) std::printf("[compile_check] sm90 backward (split, hdim256) layouts %s: %s\n", name, e.c_str());
  return e.empty() ? 0 : 1;
}
int main() {
  const int bad = check<__nv_bfloat16, 64>("bf16") + check<__nv_bfloat16, 128>("bf16") +
                  check<__nv_bfloat16, 256>("bf16") + check<__half, 64>("fp16") + check<__half, 128>("fp16") +
                  check<__half, 256>("fp16") + check<__nv_bfloat16, 64, 1>("bf16") +
                  check<__nv_bfloat16, 128, 1>("bf16") + check<__half, 64, 1>("fp16") + check<__half, 128, 1>("fp16");
  const int bad_bwd = check_bwd<__nv_bfloat16, 64>("bf16") + check_bwd<__nv_bfloat16, 128>("bf16") +
                      check_bwd<__half, 64>("fp16") + check_bwd<__half, 128>("fp16") +
                      check_bwd_split<__nv_bfloat16>("bf16") + check_bwd_split<__half>("fp16");
  const std::string sched = hstu::check_grouped_schedule();
  if (!sched.empty()) std::printf("[compile_check] grouped launch order: %s\n", sched.c_str());
  return bad + bad_bwd + !sched.empty();
}
CU
( "$NVCC" "${COMMON[@]}" -O0 "$WORK/sm90_layouts.cu" -o "$WORK/sm90_layouts" >"$WORK/sm90_layouts.log" 2>&1 &&
  "$WORK/sm90_layouts" >>"$WORK/sm90_layouts.log" 2>&1 ) &
layout_pid=$!

jobs_list=()
for arch in "${ARCHS[@]}"; do
  for f in "${FILES[@]}"; do jobs_list+=("$arch $f"); done
done
if [ "${HSTU_COMPILE_CHECK_ALL:-0}" != "1" ]; then
  for f in "${SM90A_SM80_FILES[@]}"; do jobs_list+=("90a $f"); done
  jobs_list+=("90a $INST/hstu_fwd_bf16_hdim128_rab_sm90.cu" "90a $INST/hstu_bwd_bf16_hdim128_rab_sm90.cu"
             "90a $INST/hstu_bwd_fp16_hdim256_rab_sm90.cu")
fi
# the benchmark-only backward variants (the head-dim-256 two-pass one is also built by the emulation harness)
jobs_list+=("80 $INST/hstu_bwd_bf16_hdim128_norab_sm80.cu -DHSTU_BENCH_VARIANTS")
[ "${HSTU_COMPILE_CHECK_ALL:-0}" = "1" ] && jobs_list+=("80 $INST/hstu_bwd_bf16_hdim256_norab_sm80.cu -DHSTU_BENCH_VARIANTS")
printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c '
  arch="$0"; f="$1"; extra="${2:-}"; o="'"$WORK"'/$(basename "$f" .cu)_$arch${extra:+_bench}.o"
  if ! "'"$NVCC"'" '"${COMMON[*]}"' $extra -gencode=arch=compute_$arch,code=sm_$arch -Xptxas=-warn-spills -c "$f" -o "$o" 2>"$o.log"; then
    echo "[compile_check] FAILED sm_$arch $f"; cat "$o.log"; exit 255
  fi
  grep -i "spill\|warning" "$o.log" | sed "s|^|[compile_check] sm_$arch $(basename $f): |" || true
  echo "[compile_check] ok sm_$arch $f $extra"'
if ! wait "$layout_pid"; then
  echo "[compile_check] FAILED sm90 layout self-check"; cat "$WORK/sm90_layouts.log"; exit 1
fi
echo "[compile_check] ok sm90 layout self-check (host)"
end=$(date +%s)
echo "[compile_check] all good in $((end - start)) s (${#jobs_list[@]} kernel TUs + binding, $JOBS jobs)"
