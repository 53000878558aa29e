#!/usr/bin/env bash
# Sets up .venv and runs the study: `bash scripts/study.sh` (default study, needs the hub)
# or `bash scripts/study.sh --preset quick` (tiny model, shipped sample, CPU, offline). Extra flags go to run_study.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# Keep a torch that is already there (say, a CUDA build you chose); otherwise pip picks one for this platform.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch>=2.4"
python -m pip install --quiet -r requirements.txt
python run_study.py "$@"
