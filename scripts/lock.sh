#!/usr/bin/env bash
# Regenerates requirements-lock.txt, the exact versions scripts/venv.sh installs (scripts/test.sh and scripts/study.sh,
# so CI too): every package the kit and its dev extra need, direct and transitive, except torch.
#
#   bash scripts/lock.sh                          # resolve the newest releases pyproject.toml's ranges allow
#   UV="python -m uv" bash scripts/lock.sh        # another way to call uv
#
# The tool is uv's `uv pip compile` (https://docs.astral.sh/uv/pip/compile/): it resolves pyproject.toml with its
# extras directly, for a stated Python and platform rather than whatever machine runs it, and in seconds; pip-tools'
# pip-compile writes the same format but resolves for the running interpreter only. Install it with `pip install uv`.
#
# torch: its version is pinned by scripts/venv.sh (TORCH_VERSION), and its build (CPU, or the CUDA build a driver
# runs) is chosen there, from PyTorch's own index. The lock resolves against the CPU build of that version (PyPI's Linux
# torch would drag in the nvidia-* and triton packages, several GB a CPU never uses) and leaves torch itself out, so
# one lock serves every build: torch's own dependencies (sympy, networkx, jinja2, ...) are pinned, a CUDA build's
# nvidia-* packages come with that build. The resolution is for Linux x86-64 and Python 3.11, what CI and the GPU
# machines run; other platforms install from pyproject.toml's ranges (STUDYKIT_LOCK=0).
#
# Move the lock forward after scripts/check_latest_versions.sh passed on the newest releases: run this, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION=\${TORCH_VERSION:-\(.*\)}$/\1/p' scripts/venv.sh)
[ -n "$TORCH_VERSION" ] || { echo "error: no TORCH_VERSION default found in scripts/venv.sh." >&2; exit 2; }
OVERRIDE=$(mktemp /tmp/studykit-lock-torch.XXXXXX)
trap 'rm -f "$OVERRIDE" "$OVERRIDE.lock"' EXIT
echo "torch==$TORCH_VERSION+cpu" >"$OVERRIDE"
# The CPU wheel from PyTorch's CPU index, or from a directory that holds it (TORCH_WHEELS, like pip's find-links)
# on a machine that cannot reach that index.
TORCH_SOURCE=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
for directory in ${TORCH_WHEELS:-/opt/wheels}; do
  if compgen -G "$directory/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then TORCH_SOURCE=(--find-links "$directory"); fi
done
$UV pip compile pyproject.toml --extra dev \
  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
  "${TORCH_SOURCE[@]}" \
  --override "$OVERRIDE" --no-emit-package torch --no-emit-index-url --no-emit-find-links \
  --custom-compile-command "bash scripts/lock.sh" \
  --quiet -o "$OVERRIDE.lock"
# What the file is and how it is used, above uv's own header (which names the command that regenerates it).
{
  echo "# The versions scripts/test.sh, scripts/study.sh and CI install: scripts/venv.sh passes this file to pip as"
  echo "# constraints (pip install -c requirements-lock.txt -e \".[dev]\"), so it pins whatever the kit needs, and"
  echo "# pyproject.toml keeps its ranges for \`pip install -e .\`. torch $TORCH_VERSION is pinned by scripts/venv.sh, which"
  echo "# also picks its build (CPU or CUDA); it was resolved here as its CPU build and is left out. Do not edit by hand."
  cat "$OVERRIDE.lock"
} >requirements-lock.txt
rm -f "$OVERRIDE.lock"
echo "wrote requirements-lock.txt (torch $TORCH_VERSION left to scripts/venv.sh)"
