#!/usr/bin/env bash
# The test command: set-up, a compile check of every CUDA kernel with nvcc (when nvcc exists),
# lint and format checks, then the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1; then
  bash scripts/nvcc_check.sh
else
  echo "nvcc not found: CUDA kernels not compile-checked on this machine"
fi
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest python_tests -q -p no:cacheprovider "$@"
