#!/usr/bin/env bash
# The test suite: bootstraps .venv (first run only), then runs every test. GPU tests skip without CUDA.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/ops -k attention`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [[ $# -eq 0 ]]; then set -- tests; fi
exec python -m pytest -q -p no:cacheprovider "$@"
