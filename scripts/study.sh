#!/usr/bin/env bash
# Sets up .venv (the torch build this machine needs, then the kit) and runs the study: `bash scripts/study.sh` (default
# study, needs the hub) or `bash scripts/study.sh --preset quick` (tiny model, shipped sample, CPU, offline). Extra
# flags go to studykit-study (the same as run_study.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
studykit-study "$@"
