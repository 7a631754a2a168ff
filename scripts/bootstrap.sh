#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with the pinned CPU stack, then activates it.
# Sourced by scripts/main.sh and scripts/test.sh so that a fresh checkout needs no other set-up step.
# Set HSTU_VENV to use another location; HSTU_SKIP_BOOTSTRAP=1 uses the current python as is.
set -eo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${HSTU_SKIP_BOOTSTRAP:-0} == 1 ]]; then
  return 0 2>/dev/null || exit 0
fi
venv=${HSTU_VENV:-$repo_root/.venv}
stamp=$venv/.hstu-bootstrap-v1
if [[ ! -f $stamp ]]; then
  echo "[bootstrap] creating $venv (first run only; a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # CPU torch: the wheel on disk when present, else PyPI's CPU index is not reachable here, so plain pin.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q "fbgemm-gpu-cpu==1.8.0" "tensordict==0.15.3" "torchmetrics==1.0.3" \
    tqdm pyre-extensions iopath "megatron-core==0.16.1" "gin-config==0.5.0" numpy pytest hypothesis \
    matplotlib tensorboard ninja
  # --no-deps: torchrec's and nvidia-cutlass's declared dependencies would pull GPU builds of fbgemm and more.
  "$venv/bin/python" -m pip install -q --no-deps "torchrec==1.8.0" "nvidia-cutlass==4.2.0.0"
  "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$repo_root"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
