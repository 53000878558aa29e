#!/usr/bin/env bash
# Sets up .venv (CPU torch, the kit with its test tools), then runs ruff and the test suite. The README's test
# command; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_BUILD=cpu STUDYKIT_EXTRAS="[dev]" . scripts/venv.sh
# Lint and formatting first (pyproject.toml's [tool.ruff], line length 120): a second or two, before minutes of tests.
ruff check .
ruff format --check .
# One thread per test process: two workers on two cores. Two threads each would make four on two cores, and torch's
# threads then wait for each other (a tiny model's step took 50x as long).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -n 2 "$@"
