#!/usr/bin/env bash
# Sets up .venv and runs the study: `bash scripts/study.sh` (default study, needs the hub)
# or `bash scripts/study.sh --preset quick` (tiny model, shipped sample, CPU, offline). Extra flags go to run_study.py.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="torch>=2.4" . scripts/venv.sh
python -m pip install --quiet -r requirements.txt
python run_study.py "$@"
