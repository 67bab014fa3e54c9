#!/usr/bin/env bash
# The main job: set-up, then the end-to-end demo on scikit-learn's bundled handwritten digits
# (train RS and DRS models, certify test images with both, print the table, save the plot).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
drs demo "$@"
