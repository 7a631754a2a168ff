#!/usr/bin/env bash
# GPU-machine check of the fused HSTU attention kernels: build, CUDA parity tests, compute-sanitizer memcheck +
# racecheck on a small representative subset, benchmark. Logs and results go to $OUT (default ./gpu_check_out):
#   build.log  test.log  sanitizer.log  bench.log  attention_<gpu>.json  attention_<gpu>.png  summary.txt
# Stages: HSTU_GPU_STAGES (default "build test sanitize bench"; also "bench_alt", and "prebuild" on a CPU machine);
# per-stage time limits in seconds:
# HSTU_T_BUILD / HSTU_T_TEST / HSTU_T_SANITIZE / HSTU_T_BENCH; HSTU_SANITIZE_TOOLS (default "memcheck racecheck");
# HSTU_TEST_K (a pytest -k expression), HSTU_BENCH_ARGS (extra benchmark arguments). On sm_90 the warp-specialized
# wgmma forward and the wgmma backward are the defaults (csrc/hstu_attention/heuristics.h); the sanitizer runs each
# eligible backward case on both backwards and the forward cases also on the single-role and ping-pong wgmma forwards
# (plus the persistent forward on launches with more work items than blocks), each picked with a KernelVariant, and
# the benchmark times the mma.sync kernels next to them. HSTU_BENCH_VARIANTS=1 builds the benchmark-only kernel
# variants too (the bench_alt stage needs them). On the lent machine run it as
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

# Prebuilt kernels: `HSTU_GPU_STAGES=prebuild bash scripts/gpu_check.sh` (on any machine with nvcc 13.0 and the
# CUTLASS headers, no GPU) compiles the kernel instantiations for sm_90a with setup.py's nvcc flags into
# .device/hstu_objs and packs .device/hstu_objs.tar.xz (carry that). Each object carries the hash of its unit, the
# local headers it includes (transitively), the defines and the target, so a later prebuild recompiles only the
# units an edit touched. The build stage unpacks them, compiles the stale or missing units here, compiles the
# torch binding and links; on any failure it falls back to the full setup.py build.
OBJ_DIR="${HSTU_OBJ_DIR:-$ROOT/.device/hstu_objs}"
DISABLE_NAMES="HSTU_DISABLE_BF16 HSTU_DISABLE_FP16 HSTU_DISABLE_HDIM32 HSTU_DISABLE_HDIM64 HSTU_DISABLE_HDIM128 HSTU_DISABLE_HDIM256 HSTU_DISABLE_RAB HSTU_DISABLE_BACKWARD"
sm90_off() { [[ "${HSTU_DISABLE_SM90:-0}" =~ ^(1|true|yes|on)$ ]]; }
# (prebuilt objects are sm_90a: with the Hopper forward units unless HSTU_DISABLE_SM90, as setup.py decides)
defines() {
  for n in $DISABLE_NAMES HSTU_BENCH_VARIANTS; do [[ "${!n:-0}" =~ ^(1|true|yes|on)$ ]] && printf -- '-D%s ' "$n"; done
  sm90_off || printf -- '-DHSTU_WITH_SM90_FWD '
  true
}
selected_units() {
  for f in csrc/hstu_attention/instantiations/*.cu; do
    b=$(basename "$f")
    [[ "${HSTU_DISABLE_BACKWARD:-0}" =~ ^(1|true|yes|on)$ && $b == hstu_bwd_* ]] && continue
    [[ "${HSTU_DISABLE_RAB:-0}" =~ ^(1|true|yes|on)$ && $b == *_rab_* ]] && continue
    sm90_off && [[ $b == *_sm90.cu ]] && continue
    skip=0
    for part in BF16 FP16 HDIM32 HDIM64 HDIM128 HDIM256; do
      n=HSTU_DISABLE_$part
      lower=$(echo "$part" | tr 'A-Z' 'a-z')
      [[ "${!n:-0}" =~ ^(1|true|yes|on)$ && $b == *_${lower}_* ]] && skip=1
    done
    [ $skip = 0 ] && echo "$f"
  done
}
# "<unit> <hash>" per selected unit: the unit, its local #include closure, the defines, the target
unit_hashes() {
  selected_units | HSTU_DEFS="$(defines)" $PY -c '
import hashlib, os, pathlib, re, sys
inc = re.compile(r"^\s*#\s*include\s+\"([^\"]+)\"", re.M)
def closure(path, seen):
    for name in inc.findall(path.read_text()):
        dep = (path.parent / name).resolve()
        if dep.is_file() and dep not in seen:
            seen.add(dep)
            closure(dep, seen)
    return seen
for unit in sys.stdin.read().split():
    u = pathlib.Path(unit).resolve()
    h = hashlib.sha256()
    for f in [u] + sorted(closure(u, set())):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update((os.environ["HSTU_DEFS"] + " sm_90a").encode())
    print(unit, h.hexdigest()[:16])
'
}
# compiles the units whose object is missing or stale into $OBJ_DIR (JOBS in parallel); prints how many
compile_stale_units() {
  local cutlass_inc="$1" stale
  mkdir -p "$OBJ_DIR"
  export NVCC_FLAGS="-O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda -lineinfo -Xptxas=-warn-spills -DNDEBUG \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ $(defines) -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC \
    -I$ROOT/csrc/hstu_attention -I$cutlass_inc"
  stale=$(unit_hashes | while read -r unit hash; do
    o="$OBJ_DIR/$(basename "$unit" .cu)"
    [ -f "$o.o" ] && [ "$(cat "$o.hash" 2>/dev/null)" = "$hash" ] || echo "$unit $hash"
  done)
  echo "$stale" | grep -c . >"$OBJ_DIR/.stale_count"
  [ -z "$stale" ] && return 0
  echo "$stale" | xargs -P "${JOBS:-$(nproc)}" -L1 bash -c \
    'o="'"$OBJ_DIR"'/$(basename "$0" .cu)"; rm -f "$o.hash"; nvcc $NVCC_FLAGS -c "$0" -o "$o.o" && echo "$1" >"$o.hash" || exit 255'
}

if has prebuild; then
  CUTLASS_INC="${CUTLASS_INCLUDE_DIR:-$($PY -c 'import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).resolve().parent / "source" / "include")')}"
  t0=$(date +%s)
  compile_stale_units "$CUTLASS_INC"
  rc=$?
  # objects of units no longer selected (or renamed) do not travel
  keep=$(unit_hashes | awk '{print $1}' | xargs -n1 basename | sed 's/\.cu$//')
  for o in "$OBJ_DIR"/*.o; do [ -e "$o" ] || continue; n=$(basename "$o" .o); echo "$keep" | grep -qx "$n" || rm -f "$o" "$OBJ_DIR/$n.hash"; done
  [ $rc -eq 0 ] && (cd "$(dirname "$OBJ_DIR")" && XZ_OPT="-6 -T0" tar -cJf "$(basename "$OBJ_DIR").tar.xz" "$(basename "$OBJ_DIR")")
  note "prebuild rc=$rc in $(( $(date +%s) - t0 )) s: $(cat "$OBJ_DIR/.stale_count") units compiled, $(ls "$OBJ_DIR"/*.o 2>/dev/null | wc -l) objects"
  [[ " $STAGES " == " prebuild " ]] && exit $rc
fi

# carry the compressed objects (.device/hstu_objs.tar.xz): the directory itself is over the transfer limit
if has build && [ -f "$OBJ_DIR.tar.xz" ] && [[ "$TORCH_CUDA_ARCH_LIST" == "9.0a" ]]; then
  t0=$(date +%s)
  $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$OBJ_DIR.tar.xz" "$(dirname "$OBJ_DIR")"
  compile_stale_units "${CUTLASS_INCLUDE_DIR:?set by .device/wheels/setup.sh}" >"$OUT/build.log" 2>&1
  rc=$?
  note "build: $(cat "$OBJ_DIR/.stale_count" 2>/dev/null) stale kernel units compiled here, rc=$rc in $(( $(date +%s) - t0 )) s"
  if [ $rc -eq 0 ]; then
    HSTU_OBJS="$(unit_hashes | awk '{print $1}' | xargs -n1 basename | sed "s|\.cu$|.o|; s|^|$OBJ_DIR/|" | tr '\n' ' ')" \
      HSTU_DEFINES="$(defines)" timeout "${HSTU_T_BUILD:-300}" $PY - >>"$OUT/build.log" 2>&1 <<'PY'
import os, shutil, sysconfig
from torch.utils.cpp_extension import load
cutlass = os.environ.get("CUTLASS_INCLUDE_DIR", "")
m = load(name="_C", sources=["csrc/hstu_attention/hstu_api.cpp", "csrc/jagged/jagged.cu", "csrc/layer/norm_mul_dropout.cu"], extra_cflags=["-O3", "-DNDEBUG", *os.environ["HSTU_DEFINES"].split()],
         extra_include_paths=["csrc/hstu_attention", cutlass], extra_ldflags=os.environ["HSTU_OBJS"].split(),
         build_directory=os.makedirs("/tmp/hstu_link", exist_ok=True) or "/tmp/hstu_link", with_cuda=True, verbose=True)
dst = os.path.join("hstu", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
shutil.copy(m.__file__, dst)
print("linked", dst, "from prebuilt objects")
PY
    rc=$?
  fi
  note "build (prebuilt + stale kernel objects, binding compiled + linked here) rc=$rc in $(( $(date +%s) - t0 )) s"
  if [ $rc -eq 0 ] && $PY -c 'import torch; from hstu import _C; _C.build_info()' >>"$OUT/build.log" 2>&1; then
    STAGES="${STAGES/build/}"
  else
    note "prebuilt link failed: full build"; tail -5 "$OUT/build.log"
  fi
fi

if has build; then
  t0=$(date +%s)
  timeout "${HSTU_T_BUILD:-300}" env HSTU_FORCE_BUILD=1 $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
  rc=$?
  note "build rc=$rc in $(( $(date +%s) - t0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
  grep -E "ptxas warning|error:|Error" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -c 'import torch; from hstu import _C; print("extension:", _C.build_info())' 2>&1 | tee -a "$SUMMARY"

if has test; then
  t0=$(date +%s)
  timeout "${HSTU_T_TEST:-240}" $PY -m pytest -q -p no:cacheprovider --tb=line -rf --maxfail=40 \
    tests/ops/test_hstu_attention_cuda_*.py ${HSTU_TEST_K:+-k "$HSTU_TEST_K"} >"$OUT/test.log" 2>&1
  rc=$?
  note "tests rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/test.log")"
  grep -E "^FAILED|Error" "$OUT/test.log" | head -25 | cut -c1-400 | tee -a "$SUMMARY"
fi

if has sanitize; then
  cat >"$OUT/sanitize_case.py" <<'PY'
import torch
from hstu.ops.hstu_attention import cuda
from hstu.ops.hstu_attention.args import AttentionArgs
V = cuda.KernelVariant
offsets = torch.tensor([0, 0, 1, 70, 200], dtype=torch.int32, device="cuda")
# (head dim, rab heads, causal, window, targets, rab gradient); the cases without a rab gradient at head dims
# 64 / 128 / 256 are the ones the sm90 backward takes (on sm_90): their atomic-dq backward runs on both
for dim, rab_heads, causal, window, tgt, rab_grad in [(64, 1, True, -1, True, True), (128, 2, True, 9, False, True),
                                                      (256, 0, False, 20, False, False), (32, 2, True, -1, True, True),
                                                      (64, 2, True, -1, True, False), (128, 0, True, 9, True, False)]:
    T, H = 200, 2
    q, k, v = (torch.randn(T, H, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rab = torch.randn(4, rab_heads, 131, 131, device="cuda", dtype=torch.bfloat16) if rab_heads else None
    nt = torch.tensor([0, 1, 7, 20], dtype=torch.int32, device="cuda") if tgt else None
    nc = torch.tensor([0, 0, 3, 4], dtype=torch.int32, device="cuda") if tgt else None
    args = AttentionArgs(q, k, v, offsets, 130, 0.125, 130, causal, window, nc, nt, 2, rab)
    out = cuda.forward(args)
    # atomic-dq path (wgmma backward where it applies), the same on the mma.sync kernel, then the split path
    for deterministic, sm90_bwd in ((False, True), (False, False), (True, True)):
        grads = cuda.backward(torch.randn_like(out), args._replace(deterministic=deterministic),
                              rab is not None and rab_grad, variant=V(sm90_backward=sm90_bwd))
        assert all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
# the other sm90 forwards (the cases above ran the default: at these lengths, head dims 64 / 128, the two-per-SM
# warp-specialized shape): the single-role kernel, then the ping-pong one
for variant in (V(forward_warp_specialized=False), V(forward_two_per_sm=False)):
    for dim in (64, 128, 256):
        q, k, v = (torch.randn(200, 2, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        rab = torch.randn(4, 2, 131, 131, device="cuda", dtype=torch.bfloat16)
        nt = torch.tensor([0, 1, 7, 20], dtype=torch.int32, device="cuda")
        out = cuda.forward(AttentionArgs(q, k, v, offsets, 130, 0.125, 130, True, -1, None, nt, 2, rab), variant=variant)
        assert bool(torch.isfinite(out).all())
# the persistent forward (head dims 64 / 128) with more work items than blocks, in both warp-specialized shapes
for (batch, length, heads, dim), two_per_sm in (((16, 1024, 2, 128), False), ((64, 256, 2, 64), True)):
    offs = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(batch * length, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = cuda.forward(AttentionArgs(q, k, v, offs, length, 0.125, length), variant=V(forward_two_per_sm=two_per_sm))
    assert bool(torch.isfinite(out).all())
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

# The benchmark-only kernel variants (KernelVariant.bench_*: the 8-warp head-dim-128 dk/dv kernel, the two-pass
# head-dim-256 atomic path), same shapes; they exist in builds with HSTU_BENCH_VARIANTS=1 only. Add "bench_alt" to
# HSTU_GPU_STAGES and build with HSTU_BENCH_VARIANTS=1.
if has bench_alt; then
  t0=$(date +%s)
  timeout "${HSTU_T_BENCH:-200}" $PY benchmarks/bench_attention.py --bench-variants \
    --only 'x4x(128|256)$' --no-reference --no-op --out /tmp/hstu_bench_alt --label "benchmark-only variants" \
    >"$OUT/bench_alt.log" 2>&1
  note "bench_alt (--bench-variants) rc=$? in $(( $(date +%s) - t0 )) s"
  grep -v "^wrote" "$OUT/bench_alt.log" | tee -a "$SUMMARY"
fi
