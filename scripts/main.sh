#!/usr/bin/env bash
# The main job: installs into .venv (scripts/setup.sh), then trains dense and with SAT and prints the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python examples/tiny_llama_dense_vs_sat.py "$@"
