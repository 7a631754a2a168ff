#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv, then activates it. Sourced by scripts/main.sh and
# scripts/test.sh so that a fresh checkout needs no other set-up step.
# On a machine with an NVIDIA GPU it installs the CUDA stack (CUDA torch, fbgemm-gpu and torchrec built against it)
# and builds the fused kernels when nvcc is on PATH; elsewhere the pinned CPU stack. scripts/stack_plan.py decides
# (run `python3 scripts/stack_plan.py` to see the plan without installing anything).
#   HSTU_DEVICE=auto|cpu|cuda   which stack (default auto: CUDA when `nvidia-smi -L` lists a GPU)
#   HSTU_CUDA_VARIANT=cu130     PyTorch's CUDA wheel variant (default: the newest the driver supports)
#   HSTU_VENV=DIR               another location; HSTU_SKIP_BOOTSTRAP=1 uses the current python as is
set -eo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${HSTU_SKIP_BOOTSTRAP:-0} == 1 ]]; then
  return 0 2>/dev/null || exit 0
fi
venv=${HSTU_VENV:-$repo_root/.venv}
plan_args=(--device "${HSTU_DEVICE:-auto}" --format shell)
[[ -n ${HSTU_CUDA_VARIANT:-} ]] && plan_args+=(--variant "$HSTU_CUDA_VARIANT")
plan_text=$(python3 "$repo_root/scripts/stack_plan.py" "${plan_args[@]}") || {
  echo "[bootstrap] no environment created (see the error above)" >&2
  return 1 2>/dev/null || exit 1
}
eval "$plan_text"
stamp=$venv/$plan_stamp
if [[ ! -f $stamp ]]; then
  echo "[bootstrap] setting up $venv for $plan_device (first run only; a few minutes)" >&2
  [[ -n $plan_notes ]] && printf '[bootstrap] %s\n' "$plan_notes" >&2
  if [[ ! -x $venv/bin/python ]]; then
    venv_args=()
    [[ $plan_site == 1 ]] && venv_args+=(--system-site-packages)
    python3 -m venv "${venv_args[@]}" "$venv"
  elif [[ $plan_site == 1 ]]; then
    # an environment made for another plan: let it see the interpreter's CUDA torch
    sed -i 's/^include-system-site-packages = false/include-system-site-packages = true/' "$venv/pyvenv.cfg"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  for ((i = 0; i < plan_steps; i++)); do
    step_var="plan_step_$i[@]"
    "$venv/bin/python" -m pip install -q "${!step_var}"
  done
  # With CUDA torch and nvcc this compiles the fused kernels (hstu._C; minutes): setup.py prints its progress.
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$repo_root"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
