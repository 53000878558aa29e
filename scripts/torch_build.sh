# Sourced by venv.sh (and tests/test_setup.py): which torch build this machine needs.
# The CUDA and ROCm builds PyTorch publishes for TORCH_VERSION, newest first (https://pytorch.org/get-started/locally/);
# the ROCm list is not checked against an AMD GPU by the project (docs/where-it-runs.md).
TORCH_CUDA_BUILDS=${TORCH_CUDA_BUILDS:-"13.0 12.8 12.6"}
TORCH_ROCM_BUILDS=${TORCH_ROCM_BUILDS:-"7.1 7.0 6.4"}

# What nvidia-smi says of this machine: the driver's highest CUDA version ("12.8"), or nothing without a GPU.
gpu_cuda_version() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1
}

# What rocm-smi says of this machine: nothing without an AMD GPU; with one, the installed ROCm's version ("6.4", read
# from $ROCM_PATH/.info/version, which rocm-smi itself does not print), or "unknown" where that file is missing.
gpu_rocm_version() {
  command -v rocm-smi >/dev/null 2>&1 || return 0
  rocm-smi --showproductname 2>/dev/null | grep -q 'GPU\[' || return 0
  local version
  version=$(sed -n 's/^\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' "${ROCM_PATH:-/opt/rocm}/.info/version" 2>/dev/null | head -n 1)
  echo "${version:-unknown}"
}

# The newest of $2 (a list of versions, newest first) not newer than $1, with $3 before it ("cu128", "rocm6.4").
build_for() {
  local build
  for build in $2; do
    if "$PYTHON" -c "import sys; sys.exit(0 if tuple(map(int, '$build'.split('.'))) <= tuple(map(int, '$1'.split('.'))) else 1)"; then
      echo "$3$build"
      return 0
    fi
  done
  return 1
}

# The newest of TORCH_CUDA_BUILDS that a driver supporting CUDA $1 runs, as PyTorch's index names it ("cu128").
cuda_build_for() {
  local build
  build=$(build_for "$1" "$TORCH_CUDA_BUILDS" cu) || return 1
  echo "${build/./}"
}

# The newest of TORCH_ROCM_BUILDS not newer than the installed ROCm $1, as PyTorch's index names it ("rocm6.4").
rocm_build_for() {
  build_for "$1" "$TORCH_ROCM_BUILDS" rocm
}
