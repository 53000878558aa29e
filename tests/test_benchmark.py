"""bench/benchmark.py runs end to end on a tiny model: every case measured, the evaluation's two setups agree.

Its speed figures are for a quiet machine and are never asserted here; what must hold anywhere is that each case
runs and that batching does not change the perplexity.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, run_script

from studykit.loss import torch_has_fused_loss


def test_benchmark_measures_every_case_and_batching_keeps_the_perplexity(gpt2_tokenizer_dir, tmp_path):
    """Also our trainer compiled (dynamo's eager backend: the capture without code generation), another loss kernel
    and padding, and the figures written as JSON."""
    kernel = "torch" if torch_has_fused_loss() else "studykit"
    result = run_script(
        "bench/benchmark.py",
        "--tokenizer",
        gpt2_tokenizer_dir,
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--responses",
        "40",
        "--eval-responses",
        "4",
        "--eval-repeats",
        "1",
        "--seq-len",
        "64",
        "--compile",
        "--compile-backend",
        "eager",
        "--loss-kernel",
        kernel,
        "--pad-to-multiple-of",
        "16",
        "--json",
        tmp_path / "bench.json",
    )
    output = result.stdout
    assert "failed:" not in output
    for case in ("OASST-like full", "OASST-like lora", "full-length full", "full-length lora"):
        assert re.search(rf"training {case} +\d+\.\d\dx", output), case
        assert re.search(
            rf"{case} +eager: \d+ frames, \d+ graph breaks, -?[\d.]+ s of warm-up, padded to multiples of 16", output
        ), case
    # Measured once before any case and again before each of the four.
    assert re.search(
        r"matmul peak measured here: [\d,.]+ GFLOP/s \(float32 2048 x 2048 matmul, best of 5\), the best "
        r"of 5 measurements",
        output,
    )
    assert re.search(r"data preparation: [\d,]+ messages/s", output)
    difference = float(re.search(r"perplexity relative difference ([\d.e+-]+)", output).group(1))
    assert difference < 1e-5
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["warmup_steps"] == 2 and figures["matmul_peak_tflops"] > 0
    rows = {(row["case"], row["method"], row["setup"]): row for row in figures["training"]}
    assert len(rows) == 2 * 2 * 3 and set(figures["ratios"]) == {
        "OASST-like full",
        "OASST-like lora",
        "full-length full",
        "full-length lora",
    }
    ours = rows["OASST-like", "full", "studykit trainer"]
    assert ours["pad_to_multiple_of"] == 16 and kernel in ours["loss_kernel"] and 0 < ours["share_of_matmul_peak"] < 1
    assert rows["OASST-like", "lora", "studykit --compile"]["compile"]["frames_compiled"] > 0


def test_memory_benchmark_measures_both_setups_and_the_estimate_holds_for_each_optimizer():
    result = run_script("bench/memory.py", "--batch-size", "4", "--seq-len", "128")
    row = r"^(full|lora) +(adamw\S*) +(studykit|usual setup) +([\d. a-z]+)$"
    rows = {
        (method, optimizer, setup): numbers.split()
        for method, optimizer, setup, numbers in re.findall(row, result.stdout, re.MULTILINE)
    }
    assert len(rows) == 8, result.stdout  # a CPU runs adamw and adamw8bit; paged-adamw8bit needs CUDA
    for method in ("full", "lora"):
        for optimizer in ("adamw", "adamw8bit"):
            peak, estimate, fits = rows[(method, optimizer, "studykit")]
            usual_peak, usual_fits = rows[(method, optimizer, "usual setup")]
            assert float(peak) <= float(estimate) and float(peak) < float(usual_peak), result.stdout
            assert fits == usual_fits == "yes", result.stdout
    assert float(rows[("full", "adamw8bit", "studykit")][0]) < float(rows[("full", "adamw", "studykit")][0])


def test_memory_benchmark_plans_gpt2_medium_on_the_meta_device():
    result = run_script(
        "bench/memory.py",
        "--model",
        "medium",
        "--optimizer",
        "adamw8bit",
        "--max-gpu-memory-gb",
        "6",
        "--batch-size",
        "8",
        "--gradient-checkpointing",
    )
    assert "built on the meta device (no weights)" in result.stdout, result.stdout
    rows = {
        method: numbers.split()
        for method, numbers in re.findall(r"^(full|lora) +adamw8bit +([\d. a-z]+)$", result.stdout, re.MULTILINE)
    }
    assert rows["full"] == ["5.18", "0.00", "5.68", "yes"] and rows["lora"][-1] == "yes", result.stdout
    without = run_script("bench/memory.py", "--model", "medium", "--batch-size", "8")
    full_rows = re.findall(r"^full +(\S*adamw\S*) +[\d. ]+ (yes|no)$", without.stdout, re.MULTILINE)
    assert full_rows == [("adamw", "no"), ("adamw8bit", "no"), ("paged-adamw8bit", "no")], without.stdout


# bench/gpu_check.sh needs a GPU; what can be checked here is the script, the pieces it runs and how it keeps time.


def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses_and_refuses_a_machine_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=REPO_ROOT).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no CUDA GPU is visible"), result.stderr
    assert not (tmp_path / "out").exists()
    usage = subprocess.run(["bash", "bench/gpu_check.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert "bash bench/gpu_check.sh --cpu-smoke [OUTPUT_DIR]" in usage.stdout


def test_gpu_check_keeps_each_pieces_figures_and_its_time_limit(tmp_path, monkeypatch):
    """Fast stand-ins for the pieces: one that prints memory rows, two that write figures, one that runs past its
    time; the medium piece is skipped while the kit lacks what it needs."""
    check = gpu_check()
    row = {
        "case": "OASST-like",
        "method": "full",
        "setup": "studykit trainer",
        "real_tokens_per_second": 10.0,
        "mfu": None,
        "share_of_matmul_peak": 0.5,
        "peak_gib": 1.0,
        "warmup_seconds": 0.1,
    }
    figures = {
        "matmul_peak_tflops": 0.2,
        "matmul_peak_measured_by": "a stand-in",
        "warmup_steps": 2,
        "ratios": {"x": 3.5},
        "training": [row],
        "evaluation": {"ours_tps": 2.0, "loop_tps": 1.0, "ours_ppl": 5.0, "loop_ppl": 5.0},
    }
    kernels = {
        "positions": 8,
        "vocab": 50,
        "width": 4,
        "precision": "fp16",
        "skipped": {"liger": "no GPU"},
        "cases": [{"mode": "evaluation", "kernel": "torch", "seconds": 0.5, "peak_bytes": 2**20}],
        "errors": {"torch": {"loss": 1e-3, "per_position_nll": 1e-3, "hidden": 1e-3, "weight": 1e-3}},
    }

    def stand_ins(smoke, scratch):
        def write(name, figures):
            script = f"import json, pathlib; pathlib.Path({str(scratch / name)!r}).write_text(json.dumps({figures!r}))"
            return [sys.executable, "-c", script]

        rows = "full     studykit            1.25          1.50\nfull     usual setup         2.00              "
        return {
            "memory": [sys.executable, "-c", f"print({rows!r})"],
            "training": write("training.json", figures),
            "loss": write("loss.json", kernels),
            "compile": [sys.executable, "-c", "import time; time.sleep(60)"],
        }

    monkeypatch.setattr(check, "piece_commands", stand_ins)
    monkeypatch.setattr(check, "help_text", lambda script: "usage: --model {tiny,small}")
    results = check.run_check(check.parse_args(["--output-dir", str(tmp_path), "--budget", "8"]))
    pieces = results["pieces"]
    assert pieces["memory"]["result"] == [
        {"method": "full", "setup": "studykit", "peak_gib": 1.25, "estimate_gib": 1.5},
        {"method": "full", "setup": "usual setup", "peak_gib": 2.0, "estimate_gib": None},
    ]
    assert pieces["training"]["status"] == "ok" and pieces["training"]["result"]["ratios"] == {"x": 3.5}
    assert pieces["medium"]["status"] == "skipped"
    assert pieces["medium"]["reason"].startswith("bench/memory.py offers no --model medium; the trainer has no")
    assert pieces["compile"]["status"] == "timed out"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["pieces"].keys() == pieces.keys()
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| full | studykit | 1.25 | 1.50 |" in table and "| x | 3.50x |" in table
    assert "| evaluation | torch | 0.5000 | 1 |" in table and "Skipped liger: no GPU" in table
    assert "| compile | timed out |" in table


def test_gpu_check_finds_what_the_medium_piece_needs():
    check = gpu_check()
    assert check.offers_medium("--model {medium,small,tiny}  GPT-2's vocabulary")
    assert not check.offers_medium("--model {tiny}")
    assert check.lean_optimizer("--optimizer {adamw,adamw8bit,adamw_cpu_offload}") == "adamw8bit"
    assert check.lean_optimizer("--optimizer {adamw,adamw_cpu_offload}") == "adamw_cpu_offload"
    assert check.lean_optimizer("--optimizer {adamw}") is None and check.lean_optimizer("--lr LR") is None
    assert "--model" in check.help_text("bench/memory.py")
    assert "--max-steps" in check.help_text("training/train_full_ft.py")


def test_gpu_check_caps_a_piece_and_the_medium_piece_reads_the_trainers_record(tmp_path):
    command = [sys.executable, "bench/gpu_check.py", "--run-capped", "bench/loss_kernels.py", "--help"]
    capped = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert capped.returncode == 0 and "--positions" in capped.stdout
    # The medium piece on the tiny shape: LoRA trains, and full FT with an --optimizer this trainer may not take yet
    # is either measured or one failed line.
    found = gpu_check().medium_piece(tmp_path, "adamw8bit", smoke=True)
    assert found["lora"]["peak_gib"] > 0 and found["lora"]["peak_memory_kind"] == "process_max_rss"
    assert "peak_gib" in found["full"] or "--optimizer" in found["full"]["error"]
