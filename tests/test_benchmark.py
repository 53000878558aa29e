"""bench/benchmark.py runs end to end on a tiny model: every case measured, the evaluation's two setups agree.

Its speed figures are for a quiet machine and are never asserted here; what must hold anywhere is that each case
runs and that batching does not change the perplexity.
"""

import json
import re

from conftest import run_script

from studykit.loss import torch_has_fused_loss


def test_benchmark_measures_every_case_and_batching_keeps_the_perplexity(gpt2_tokenizer_dir, tmp_path):
    """Also our trainer compiled (dynamo's eager backend: the capture without code generation), another loss kernel
    and padding, and the figures written as JSON."""
    kernel = "torch" if torch_has_fused_loss() else "studykit"
    result = run_script("bench/benchmark.py", "--tokenizer", gpt2_tokenizer_dir, "--steps", "3", "--batch-size", "2",
                        "--responses", "40", "--eval-responses", "4", "--eval-repeats", "1", "--seq-len", "64", "--compile",
                        "--compile-backend", "eager", "--loss-kernel", kernel, "--pad-to-multiple-of", "16",
                        "--json", tmp_path / "bench.json")
    output = result.stdout
    assert "failed:" not in output
    for case in ("OASST-like full", "OASST-like lora", "full-length full", "full-length lora"):
        assert re.search(rf"training {case} +\d+\.\d\dx", output), case
        assert re.search(rf"{case} +eager: \d+ frames, \d+ graph breaks, -?[\d.]+ s of warm-up, padded to multiples of 16",
                         output), case
    assert re.search(r"matmul peak measured here: [\d,.]+ GFLOP/s \(float32 2048 x 2048 matmul, best of 5\)", output)
    assert re.search(r"data preparation: [\d,]+ messages/s", output)
    difference = float(re.search(r"perplexity relative difference ([\d.e+-]+)", output).group(1))
    assert difference < 1e-5
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["warmup_steps"] == 2 and figures["matmul_peak_tflops"] > 0
    rows = {(row["case"], row["method"], row["setup"]): row for row in figures["training"]}
    assert len(rows) == 2 * 2 * 3 and set(figures["ratios"]) == {"OASST-like full", "OASST-like lora", "full-length full",
                                                                  "full-length lora"}
    ours = rows["OASST-like", "full", "studykit trainer"]
    assert ours["pad_to_multiple_of"] == 16 and kernel in ours["loss_kernel"] and 0 < ours["share_of_matmul_peak"] < 1
    assert rows["OASST-like", "lora", "studykit --compile"]["compile"]["frames_compiled"] > 0


def test_memory_benchmark_measures_both_setups_and_the_estimate_holds():
    result = run_script("bench/memory.py", "--batch-size", "4", "--seq-len", "128")
    rows = {(method, setup): [float(number) for number in numbers.split()]
            for method, setup, numbers in re.findall(r"^(full|lora) +(studykit|usual setup) +([\d. ]+)$", result.stdout, re.MULTILINE)}
    assert len(rows) == 4, result.stdout
    for method in ("full", "lora"):
        peak, estimate = rows[(method, "studykit")]
        (usual_peak,) = rows[(method, "usual setup")]
        assert peak <= estimate and peak < usual_peak, result.stdout
