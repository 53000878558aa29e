# Sourced by venv.sh (and tests/test_setup.py): which torch build this machine needs.
# The CUDA builds PyTorch publishes for TORCH_VERSION, newest first (https://pytorch.org/get-started/locally/).
TORCH_CUDA_BUILDS=${TORCH_CUDA_BUILDS:-"13.0 12.8 12.6"}

# What nvidia-smi says of this machine: the driver's highest CUDA version ("12.8"), or nothing without a GPU.
gpu_cuda_version() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# The newest of TORCH_CUDA_BUILDS that a driver supporting CUDA $1 runs, as PyTorch's index names it ("cu128").
cuda_build_for() {
  local build
  for build in $TORCH_CUDA_BUILDS; do
    if "$PYTHON" -c "import sys; sys.exit(0 if tuple(map(int, '$build'.split('.'))) <= tuple(map(int, '$1'.split('.'))) else 1)"; then
      echo "cu${build/./}"
      return 0
    fi
  done
  return 1
}
