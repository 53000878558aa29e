# Sourced by study.sh and test.sh: check the Python version, create .venv on first use, activate it, install the torch
# build this machine needs if torch is missing, then the kit itself (`pip install -e .`) at the locked versions.
#
# TORCH_BUILD=cpu (test.sh: the tests always run on the CPU) or auto (study.sh): on a machine where nvidia-smi sees a
# GPU, a CUDA build its driver supports; where rocm-smi sees an AMD GPU, the ROCm build for the installed ROCm; elsewhere
# the CPU build (a GPU build is several GB a CPU never uses). A Mac's torch from PyPI runs on its GPU (MPS) as it is.
# TORCH_INDEX_URL chooses the index by hand (e.g. https://download.pytorch.org/whl/cu126), TORCH_VERSION the release
# (default: the one the test suite runs on), PYTHON the interpreter. The kit's dependencies come at the versions of
# requirements-lock.txt (scripts/lock.sh regenerates it); STUDYKIT_LOCK=0 takes the newest its ranges allow instead.
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_BUILD=${TORCH_BUILD:-auto}

# tomllib (the study files) is 3.11's; a 3.10 would otherwise install everything and then fail at import.
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "error: the kit needs Python 3.11 or newer, and $PYTHON is $("$PYTHON" -V 2>&1 || echo 'not found'); run again with PYTHON=python3.11 (or newer) bash $0." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

. scripts/torch_build.sh

DRIVER_CUDA=$([ "$TORCH_BUILD" = cpu ] || gpu_cuda_version)
ROCM_VERSION=$([ "$TORCH_BUILD" = cpu ] || [ -n "$DRIVER_CUDA" ] || gpu_rocm_version)
# torch first, and only if missing: a bare `torch` requirement (ours, or another package's) would pull whichever build
# pip's index offers, a multi-GB CUDA one on Linux, over the one chosen here.
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "installing torch==$TORCH_VERSION from $TORCH_INDEX_URL (TORCH_INDEX_URL)"
    python -m pip install --quiet --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
  elif [ -n "$DRIVER_CUDA" ]; then
    if ! CUDA_BUILD=$(cuda_build_for "$DRIVER_CUDA"); then
      echo "error: this GPU's driver supports CUDA $DRIVER_CUDA, older than every CUDA build of torch $TORCH_VERSION ($TORCH_CUDA_BUILDS); update the driver, or choose a build with TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ (and TORCH_VERSION)." >&2
      exit 2
    fi
    echo "nvidia-smi sees a GPU (driver for CUDA $DRIVER_CUDA): installing torch==$TORCH_VERSION, the $CUDA_BUILD build"
    python -m pip install --quiet --index-url "https://download.pytorch.org/whl/$CUDA_BUILD" "torch==$TORCH_VERSION"
  elif [ -n "$ROCM_VERSION" ]; then
    if [ "$ROCM_VERSION" = unknown ] || ! ROCM_BUILD=$(rocm_build_for "$ROCM_VERSION"); then
      echo "error: rocm-smi sees an AMD GPU, but ROCm's version (${ROCM_PATH:-/opt/rocm}/.info/version: $ROCM_VERSION) matches none of torch $TORCH_VERSION's ROCm builds ($TORCH_ROCM_BUILDS); choose one by hand with TORCH_INDEX_URL=https://download.pytorch.org/whl/rocmX.Y (and TORCH_VERSION), or set ROCM_PATH." >&2
      exit 2
    fi
    echo "rocm-smi sees an AMD GPU (ROCm $ROCM_VERSION): installing torch==$TORCH_VERSION, the $ROCM_BUILD build"
    python -m pip install --quiet --index-url "https://download.pytorch.org/whl/$ROCM_BUILD" "torch==$TORCH_VERSION"
  elif [ "$(uname -s)" = Darwin ]; then
    # PyPI's macOS torch is the only macOS build (no +cpu tag); on Apple Silicon it runs on the GPU (MPS).
    echo "macOS: installing torch==$TORCH_VERSION from PyPI (on Apple Silicon it trains on the GPU through MPS)"
    python -m pip install --quiet "torch==$TORCH_VERSION"
  else
    # The +cpu build lives on PyTorch's CPU index (PyPI's Linux torch is the CUDA build); a machine with a local copy
    # of that wheel (a wheelhouse in pip's config) finds it there without reaching the index.
    echo "no NVIDIA GPU here: installing torch==$TORCH_VERSION+cpu, the CPU build"
    python -m pip install --quiet --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu" \
      2> >(grep -v -E "Retrying|NewConnectionError|Could not fetch URL|Name or service not known|Temporary failure" >&2)
  fi
fi
if [ -n "$DRIVER_CUDA" ] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: nvidia-smi sees a GPU, but the torch in .venv ($(python -c 'import torch; print(torch.__version__)' 2>/dev/null)) has no CUDA; install a CUDA build: .venv/bin/pip uninstall -y torch and run this again (it picks one for the driver), or pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ." >&2
  exit 2
fi
if [ -n "$ROCM_VERSION" ] && ! python -c "import sys, torch; sys.exit(0 if torch.version.hip and torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: rocm-smi sees an AMD GPU, but the torch in .venv ($(python -c 'import torch; print(torch.__version__)' 2>/dev/null)) cannot use it; install a ROCm build: .venv/bin/pip uninstall -y torch and run this again (it picks one for the installed ROCm), or pass TORCH_INDEX_URL=https://download.pytorch.org/whl/rocmX.Y." >&2
  exit 2
fi
# The kit, editable, with its dependencies at the versions the test suite passed with: requirements-lock.txt
# (scripts/lock.sh writes it) constrains every package the kit and its dev extra need, torch aside, whose build is the
# one above. STUDYKIT_LOCK=0 takes the newest releases pyproject.toml's ranges allow instead (what `pip install -e .`
# does; scripts/check_latest_versions.sh is the deliberate check of those). torch's bound is met by the build above,
# so pip keeps it.
if [ "${STUDYKIT_LOCK:-1}" = 0 ]; then
  python -m pip install --quiet -e ".${STUDYKIT_EXTRAS:-}"
else
  python -m pip install --quiet -c requirements-lock.txt -e ".${STUDYKIT_EXTRAS:-}"
fi
