#!/usr/bin/env bash
# The test command: installs into .venv (scripts/setup.sh), then runs the CPU test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
