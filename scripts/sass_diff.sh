#!/usr/bin/env bash
# Machine-code comparison of the kernel instantiations between a base commit and the working tree: each unit is
# compiled to a cubin per target with setup.py's device flags (no -lineinfo, so only code differences count), both
# cubins are disassembled with `cuobjdump -sass`, and the kernels are compared function by function (the header lines
# naming the file and the target are ignored). No GPU needed.
#
#   bash scripts/sass_diff.sh [--base COMMIT] [--jobs N] [--all] [--defines "-DX ..."] [--prime] [UNIT_REGEX]
#
# Default units: every *_sm90.cu unit for sm_90a and the compile-check subset of *_sm80.cu units for sm_80 and
# sm_90a; --all: every unit for every target setup.py builds it for. UNIT_REGEX narrows the list (grep -E on the
# file name). --defines adds defines to the working tree's build only (e.g. "-DHSTU_BENCH_VARIANTS" to compare the
# benchmark-only kernels too). Base cubins are cached under $SASS_CACHE (default /tmp/hstu_sass/<base commit>), so
# later runs recompile only the working tree (--prime: only fill that cache). Per unit and target it prints "identical", or "CHANGED" with the
# kernels that differ, exist only in the base ("gone") or only in the working tree ("new"); exit status 1 when any
# unit changed. cuobjdump and nvdisasm: $CUOBJDUMP, PATH, the CUDA toolkit, or
#   pip install --target /tmp/cuobj nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm   (then PATH=/tmp/cuobj/nvidia/cu13/bin)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BASE=dbb67b2
JOBS="${JOBS:-$(nproc)}"
ALL=0
PRIME=0
EXTRA_DEFINES=""
PATTERN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --all) ALL=1; shift ;;
    --prime) PRIME=1; shift ;;
    --defines) EXTRA_DEFINES="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) PATTERN="$1"; shift ;;
  esac
done
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CUDA_BIN="$(dirname "$(readlink -f "$NVCC")")"
for d in "$CUDA_BIN" /usr/local/cuda/bin /tmp/cuobj/nvidia/cu13/bin; do [ -d "$d" ] && PATH="$PATH:$d"; done
CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [ -z "$CUOBJDUMP" ] || ! command -v nvdisasm >/dev/null; then
  echo "sass_diff: cuobjdump / nvdisasm not found (see the header of $0 for a pip install)" >&2
  exit 2
fi
CUTLASS_INC="${CUTLASS_INCLUDE_DIR:-$("$PY" -c 'import cutlass_library, pathlib; print(pathlib.Path(cutlass_library.__file__).resolve().parent / "source" / "include")')}"
BASE_SHA="$(git rev-parse --short "$BASE")"
CACHE="${SASS_CACHE:-/tmp/hstu_sass/$BASE_SHA}"
mkdir -p "$CACHE/tree" "$CACHE/cubin"
[ -f "$CACHE/tree/.extracted" ] || { git archive "$BASE_SHA" csrc | tar -x -C "$CACHE/tree" && touch "$CACHE/tree/.extracted"; }
NEW="${SASS_NEW:-$(mktemp -d)}"  # SASS_NEW=DIR keeps the working tree's cubins and SASS there
mkdir -p "$NEW"
[ -n "${SASS_NEW:-}" ] || trap 'rm -rf "$NEW"' EXIT

# setup.py's nvcc flags (and the defines torch's extension builder adds) without -lineinfo / -Xptxas=-warn-spills
FLAGS="-O3 -std=c++17 --expt-relaxed-constexpr --expt-extended-lambda -DNDEBUG -D__CUDA_NO_HALF_OPERATORS__
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -DHSTU_WITH_SM90_FWD"
INST=csrc/hstu_attention/instantiations
if [ "$ALL" = 1 ]; then
  mapfile -t UNITS < <(cd "$INST" && ls *.cu)
else
  mapfile -t UNITS < <(cd "$INST" && ls *_sm90.cu; printf '%s\n' hstu_fwd_bf16_hdim32_norab_sm80.cu \
    hstu_fwd_fp16_hdim64_rab_sm80.cu hstu_fwd_bf16_hdim128_rab_sm80.cu hstu_fwd_bf16_hdim256_norab_sm80.cu \
    hstu_bwd_fp16_hdim32_rab_sm80.cu hstu_bwd_bf16_hdim64_norab_sm80.cu hstu_bwd_bf16_hdim128_rab_sm80.cu \
    hstu_bwd_bf16_hdim128_norab_sm80.cu hstu_bwd_fp16_hdim256_rab_sm80.cu)
fi
[ -n "$PATTERN" ] && mapfile -t UNITS < <(printf '%s\n' "${UNITS[@]}" | grep -E "$PATTERN" || true)
jobs_list=()
for u in "${UNITS[@]}"; do
  if [[ $u == *_sm90.cu ]]; then jobs_list+=("90a $u"); else jobs_list+=("80 $u" "90a $u"); fi
done
[ ${#jobs_list[@]} -gt 0 ] || { echo "sass_diff: no unit matches '$PATTERN'" >&2; exit 2; }

# compile_one ARCH UNIT: the base cubin (cached) and the working tree's, each disassembled to <name>.sass
export NVCC FLAGS CUTLASS_INC CACHE NEW EXTRA_DEFINES ROOT INST CUOBJDUMP PRIME
printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c '
  arch="$0"; unit="$1"; name="${unit%.cu}_sm$arch"
  build() {  # tree out defines
    "$NVCC" $FLAGS $3 -I"$1/csrc/hstu_attention" -I"$CUTLASS_INC" -cubin -gencode=arch=compute_$arch,code=sm_$arch \
      "$1/$INST/$unit" -o "$2.cubin" 2>"$2.log" || { echo "sass_diff: FAILED to compile $unit (sm_$arch) in $1"; cat "$2.log"; exit 255; }
    "$CUOBJDUMP" -sass "$2.cubin" >"$2.sass"
  }
  [ -s "$CACHE/cubin/$name.sass" ] || build "$CACHE/tree" "$CACHE/cubin/$name" ""
  [ "$PRIME" = 1 ] || build "$ROOT" "$NEW/$name" "$EXTRA_DEFINES"'
[ "$PRIME" = 1 ] && { echo "sass_diff: base cubins of $BASE_SHA cached in $CACHE/cubin"; exit 0; }

"$PY" - "$CACHE/cubin" "$NEW" "${jobs_list[@]}" <<'PY'
import pathlib, re, sys

base_dir, new_dir, jobs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]


def kernels(path):
    """{function name: its SASS lines}; file-name, target and fatbin header lines dropped."""
    out, name = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name is not None and not re.match(r"\s*(code for sm_|Fatbin |\.{5,}|arch = |code version|host = |compile_size)", line):
            out[name].append(" ".join(line.split()))  # cuobjdump pads columns to the file's longest instruction
    return out


changed = 0
for job in jobs:
    arch, unit = job.split()
    name = f"{unit[:-3]}_sm{arch}"
    a, b = kernels(base_dir / f"{name}.sass"), kernels(new_dir / f"{name}.sass")
    diff = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    gone, new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if not (diff or gone or new):
        print(f"identical  sm_{arch:3s} {unit}  ({len(a)} kernels)")
        continue
    changed += 1
    print(f"CHANGED    sm_{arch:3s} {unit}  ({len(a)} kernels in the base, {len(b)} now)")
    for label, names in (("differs", diff), ("gone", gone), ("new", new)):
        for k in names:
            print(f"    {label:8s} {k}")
print(f"sass_diff: {len(jobs) - changed} of {len(jobs)} (unit, target) pairs identical")
sys.exit(1 if changed else 0)
PY
