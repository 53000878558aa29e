# Sourced by study.sh and test.sh: create .venv on first use, activate it, and install torch if it is missing.
# TORCH_SPEC picks the torch to install (test.sh asks for the CPU build; study.sh lets pip choose for the platform).
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# torch first, and only if missing: a bare `torch` requirement would pull a multi-GB CUDA build over one you chose.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "$TORCH_SPEC"
