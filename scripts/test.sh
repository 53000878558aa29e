#!/usr/bin/env bash
# Sets up .venv (CPU torch) and runs the test suite. The README's test command; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="torch==2.13.0" . scripts/venv.sh
python -m pip install --quiet -r requirements-dev.txt
python -m pytest -n 2 "$@"
