#!/usr/bin/env bash
# Installs everything drs_ext needs on a fresh machine and builds the extension in place.
# requirements.txt pins torch==2.13.0 (the CPU build here), so no multi-GB CUDA torch is pulled in;
# --no-build-isolation builds against that torch instead of fetching another one.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python3 -c "import drs_ext; print('drs_ext', drs_ext.__version__, '| CUDA kernels:', drs_ext.built_with_cuda)"
