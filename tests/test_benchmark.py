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


def test_memory_benchmark_measures_both_setups_and_the_estimate_holds_for_each_optimizer():
    result = run_script("bench/memory.py", "--batch-size", "4", "--seq-len", "128")
    row = r"^(full|lora) +(adamw\S*) +(studykit|usual setup) +([\d. a-z]+)$"
    rows = {(method, optimizer, setup): numbers.split()
            for method, optimizer, setup, numbers in re.findall(row, result.stdout, re.MULTILINE)}
    assert len(rows) == 8, result.stdout  # a CPU runs adamw and adamw8bit; paged-adamw8bit needs CUDA
    for method in ("full", "lora"):
        for optimizer in ("adamw", "adamw8bit"):
            peak, estimate, fits = rows[(method, optimizer, "studykit")]
            usual_peak, usual_fits = rows[(method, optimizer, "usual setup")]
            assert float(peak) <= float(estimate) and float(peak) < float(usual_peak), result.stdout
            assert fits == usual_fits == "yes", result.stdout
    assert float(rows[("full", "adamw8bit", "studykit")][0]) < float(rows[("full", "adamw", "studykit")][0])


def test_memory_benchmark_plans_gpt2_medium_on_the_meta_device():
    result = run_script("bench/memory.py", "--model", "medium", "--optimizer", "adamw8bit", "--max-gpu-memory-gb", "6",
                        "--batch-size", "8", "--gradient-checkpointing")
    assert "built on the meta device (no weights)" in result.stdout, result.stdout
    rows = {method: numbers.split()
            for method, numbers in re.findall(r"^(full|lora) +adamw8bit +([\d. a-z]+)$", result.stdout, re.MULTILINE)}
    assert rows["full"] == ["5.18", "0.00", "5.68", "yes"] and rows["lora"][-1] == "yes", result.stdout
    without = run_script("bench/memory.py", "--model", "medium", "--batch-size", "8")
    full_rows = re.findall(r"^full +(\S*adamw\S*) +[\d. ]+ (yes|no)$", without.stdout, re.MULTILINE)
    assert full_rows == [("adamw", "no"), ("adamw8bit", "no"), ("paged-adamw8bit", "no")], without.stdout
