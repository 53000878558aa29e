"""bench/benchmark.py runs end to end on a tiny model: every case measured, the evaluation's two setups agree.

Its speed figures are for a quiet machine and are never asserted here; what must hold anywhere is that each case
runs and that batching does not change the perplexity.
"""

import re

from conftest import run_script


def test_benchmark_measures_every_case_and_batching_keeps_the_perplexity(gpt2_tokenizer_dir):
    result = run_script("bench/benchmark.py", "--tokenizer", gpt2_tokenizer_dir, "--steps", "2", "--batch-size", "2", "--responses", "40",
                        "--eval-responses", "4", "--eval-repeats", "1", "--seq-len", "64")
    output = result.stdout
    assert "failed:" not in output
    for case in ("OASST-like full", "OASST-like lora", "full-length full", "full-length lora"):
        assert re.search(rf"training {case} +\d+\.\d\dx", output), case
    assert re.search(r"data preparation: [\d,]+ messages/s", output)
    difference = float(re.search(r"perplexity relative difference ([\d.e+-]+)", output).group(1))
    assert difference < 1e-5


def test_memory_benchmark_measures_both_setups_and_the_estimate_holds():
    result = run_script("bench/memory.py", "--batch-size", "4", "--seq-len", "128")
    rows = {(method, setup): [float(number) for number in numbers.split()]
            for method, setup, numbers in re.findall(r"^(full|lora) +(studykit|usual setup) +([\d. ]+)$", result.stdout, re.MULTILINE)}
    assert len(rows) == 4, result.stdout
    for method in ("full", "lora"):
        peak, estimate = rows[(method, "studykit")]
        (usual_peak,) = rows[(method, "usual setup")]
        assert peak <= estimate and peak < usual_peak, result.stdout
