#!/usr/bin/env bash
# A maintenance command, not part of the test suite (it downloads from PyPI): installs the NEWEST release of every
# dependency that pyproject.toml's ranges allow, ignoring requirements-lock.txt, and runs the kit's whole test suite on
# them, so what tomorrow's `pip install -e .` gets is tried deliberately, before the lock moves to it.
#
#   bash scripts/check_latest_versions.sh                           # the whole suite, two workers
#   TESTS="tests/test_pipeline.py" bash scripts/check_latest_versions.sh
#
# It ends by listing the packages whose newest release differs from the lock: when everything passed, move the lock
# forward with `bash scripts/lock.sh` (and run scripts/test.sh). torch stays at the build TORCH_SPEC names (torch==2.13.0
# by default, the version scripts/venv.sh pins; pip's find-links can hold its CPU build): its releases are a separate,
# deliberate step (TORCH_VERSION in scripts/venv.sh), and the newest CUDA build cannot run here.
#
# What was found (2026-12-06, Python 3.11.7, Linux x86-64, CPU, torch 2.13.0+cpu, two workers on two shared cores):
#   transformers 5.25.0 (which now pulls in kernels 0.19.1), peft 0.21.2, accelerate 1.16.0, datasets 5.2.0,
#   huggingface_hub 2.4.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6, pyarrow 26.0.1, bitsandbytes 0.50.2;
#   the same versions as requirements-lock.txt (it was generated that day).
#   1. kernels logs "Skipping publisher trust check ... offline mode" on stderr whenever bitsandbytes loads (peft imports
#      it), ahead of a refused command's `error:` line: fixed in the kit (studykit/dependency_logs.py keeps the
#      dependencies' loggers below ERROR quiet at every entry point unless --verbose or STUDYKIT_VERBOSE=1).
#   2. transformers 5.25 validates a config's special tokens: the quick study's tiny-model config kept GPT-2's 50256 in
#      a 512-token vocabulary (fixed in the kit: tiny.tiny_gpt2_config), and prepare's tokenizer call warned of texts
#      longer than the model's context (fixed: the tokenizer truncates at --seq-len).
#   3. A tokenizer directory without its vocabulary files loads as a tokenizer of one token (refused by the kit now).
#   Result of the whole suite on these versions, with the fixes above: 449 passed, 1 failed in 1,423 s (tree of
#   commit d8abbe8). The failure, tests/test_study.py::test_ctrl_c_during_a_study_saves_the_run_and_the_same_command_
#   continues_it, is about timing under load: the Ctrl-C reached the training but not the runner, which then printed
#   the training's own "run the same study command again" line instead of its "interrupted" one; rerun alone on the
#   same versions it passed (44 s).
set -uo pipefail
cd "$(dirname "$0")/.."
# The check runs on a copy of the working tree as it is now (tracked and untracked files git does not ignore), so
# editing the kit meanwhile does not mix versions of it into one run.
SNAPSHOT=$(mktemp -d /tmp/studykit-latest-tree.XXXXXX)
git ls-files --cached --others --exclude-standard -z | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$SNAPSHOT" || exit 2
cd "$SNAPSHOT"
echo "checking a copy of the kit in $SNAPSHOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/studykit-latest-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TESTS=${TESTS:-tests}
failed=()

step() {  # step NAME COMMAND...: run it, say how it went, remember a failure
  echo "=== $1"
  if "${@:2}"; then echo "=== $1: ok"; else echo "=== $1: FAILED"; failed+=("$1"); return 1; fi
}

"$PYTHON" -m venv --clear "$VENV" || exit 2
PIP=("$VENV/bin/python" -m pip install --quiet)
step "install $TORCH_SPEC" "${PIP[@]}" --only-binary :all: "$TORCH_SPEC" || exit 1
# The kit with every extra the tests use, each dependency at the newest release its range allows (no lock), without
# letting pip move torch.
step "install the newest releases" "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[dev]" "$TORCH_SPEC" || {
  echo "failed: ${failed[*]}"
  exit 1
}
step "pip check" "$VENV/bin/python" -m pip check
"$VENV/bin/python" -m pip list --format=freeze | grep -iE "^(torch|transformers|datasets|peft|accelerate|safetensors|tokenizers|huggingface.hub|kernels|numpy|bitsandbytes|pyarrow)=="
# What differs from the lock: the packages a `bash scripts/lock.sh` would move once this passed.
"$VENV/bin/python" - <<'PYTHON'
import re, subprocess, sys
lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements-lock.txt").read(), re.M))
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lock = {norm(name): version for name, version in lock.items()}
installed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
newer = [
    f"{name} {lock[norm(name)]} -> {version}"
    for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", installed, re.M)
    if norm(name) in lock and lock[norm(name)] != version
]
print("differs from requirements-lock.txt: " + (", ".join(newer) if newer else "nothing (the lock is current)"))
PYTHON
# One thread per test process: two workers on two cores (as scripts/test.sh).
export OMP_NUM_THREADS=1
started=$SECONDS
# shellcheck disable=SC2086  # TESTS is a list of paths
# pytest.ini adds -q; a second -q would drop the summary line with the counts.
step "tests: $TESTS" "$VENV/bin/python" -m pytest --tb=short -n 2 $TESTS
echo "tests took $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}"; exit 1; fi
echo "all passed"
