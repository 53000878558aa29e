"""Devices, precision and cost measurements."""

from __future__ import annotations

import ast
import hashlib
import os
import resource
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from studykit.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_DIRECTORIES = ("studykit", "data", "training", "evaluation")


def gpu_backend() -> Optional[str]:
    """The one question asked of the machine: the GPU torch sees, 'cuda' (ROCm builds answer 'cuda' too) before 'mps'
    (Apple Silicon), or None. Every device choice goes through here, so a test can stand in for a Mac or a GPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def mps_supports_bf16() -> bool:
    # Metal has bf16 from macOS 14 (accelerate's is_bf16_available asks the same).
    return torch.backends.mps.is_macos_or_newer(14, 0)


def resolve_precision(precision: str, device_type: str) -> str:
    """accelerate's mixed_precision name for a --precision choice on this device."""
    if precision == "auto":
        # MPS: fp32, as transformers' Trainer and torchtune default to there; fp16 and bf16 are asked for by name.
        return "fp16" if device_type == "cuda" else "no"
    if precision == "fp16" and device_type not in ("cuda", "mps"):
        raise UserError("--precision fp16 needs a CUDA or Apple (MPS) GPU; on a CPU use --precision fp32 or bf16.")
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --precision fp16 or auto.")
    if precision == "bf16" and device_type == "mps" and not mps_supports_bf16():
        raise UserError("bf16 on an Apple GPU needs macOS 14 or newer; use --precision fp16 or fp32.")
    return "no" if precision == "fp32" else precision


def precision_name(mixed_precision: str) -> str:
    """accelerate's mixed_precision as --precision names it: 'fp16', 'bf16' or 'fp32' (accelerate's 'no')."""
    return "fp32" if mixed_precision == "no" else mixed_precision


# A training on a CPU estimated to take longer than this stops (with the estimate) unless --device cpu says it is meant:
# GPT-2 Small's default budget would take a day or more there, a few steps of it a minute, the quick study seconds.
CPU_GUARD_SECONDS = 30 * 60


def device_type_for(device: str) -> str:
    """--device as a torch device type: auto takes the GPU torch sees (CUDA, then MPS), else the CPU."""
    found = gpu_backend()
    if device == "cuda" and found != "cuda":
        raise UserError(
            f"--device cuda, but this torch ({torch.__version__}) sees no CUDA GPU; install a CUDA build of torch "
            "(see Install in the README) or pass --device " + ("mps." if found == "mps" else "cpu.")
        )
    if device == "mps" and found != "mps":
        raise UserError(
            f"--device mps, but this torch ({torch.__version__}) sees no Apple GPU (MPS needs Apple Silicon and "
            "macOS 12.3 or newer); pass --device " + ("cuda." if found == "cuda" else "cpu.")
        )
    if device == "auto":
        return found or "cpu"
    return device


def cpu_matmul_tflops() -> float:
    """This CPU's fp32 matmul throughput, measured (about a tenth of a second): what a time estimate divides by."""
    import time

    size = 512
    # A generator of its own: the global one seeds the run's initialisation and dropout, which a measurement must not
    # move (every CPU training measures, since the refusal goes by the time).
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    a @ b  # warm-up
    started, repeats = time.perf_counter(), 0
    while time.perf_counter() - started < 0.1:
        a @ b
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def refuse_slow_cpu_run(device: str, what: str, work: Callable[[], tuple[int, float]]) -> None:
    """A training about to run on a CPU only because torch sees no GPU, estimated (at this CPU's measured matmul speed)
    to take over CPU_GUARD_SECONDS: say how long and stop, unless --device cpu says that is meant. The estimate decides,
    not the model's size: one step of a big model is quick, many steps of a small one are not. `work()` gives the
    model's parameters and the model FLOPs the training needs (asked only when the run would be on the CPU)."""
    if device != "auto" or gpu_backend() is not None:
        return
    parameters, flops = work()
    seconds = flops / (cpu_matmul_tflops() * 1e12)
    if seconds <= CPU_GUARD_SECONDS:
        return
    raise UserError(
        f"no GPU is visible to torch {torch.__version__}: {what} ({parameters / 1e6:,.1f}M parameters) on this CPU "
        f"would take about {duration(seconds)} at its measured matmul speed, over the {duration(CPU_GUARD_SECONDS)} "
        "a CPU training may take unasked; pass --device cpu to train on the CPU anyway, or install a CUDA build of "
        "torch (see Install in the README)."
    )


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def build_accelerator(precision: str, seed: int, device: str = "auto", **tracking):
    """The run's Accelerator; `tracking` is trackers.accelerator_tracking's log_with and project_dir (none: no
    tracker)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # A fresh accelerator per run, so one process can train several runs (tests, the study runner).
    AcceleratorState._reset_state(reset_partial_state=False)
    device_type = device_type_for(device)
    if device_type == "cuda":
        # TF32 matmuls on Ampere and newer: fp32 parts of the step run on tensor cores.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # cpu=True on a machine without CUDA is what lets `accelerate launch` / torchrun start several CPU
    # processes (gloo); without it each process would train alone.
    accelerator = Accelerator(
        mixed_precision=resolve_precision(precision, device_type), cpu=device_type == "cpu", **tracking
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and parallelism(accelerator) != "FSDP":
        # accelerate shards only across GPUs; elsewhere it quietly runs the processes as plain data parallel.
        accelerator.print(
            f"warning: the FSDP config needs CUDA GPUs; here the processes run as {parallelism(accelerator)}, "
            "each holding the whole model."
        )
    set_seed(seed)
    return accelerator


def is_sharded(accelerator) -> bool:
    """FSDP: each process holds a slice of the weights and optimizer state, so saving and loading are collectives."""
    return parallelism(accelerator) == "FSDP"


def parallelism(accelerator) -> str:
    """How the processes share the work: 'single process', 'DDP' or 'FSDP' (recorded in run.json)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "FSDP"
    return "DDP" if accelerator.num_processes > 1 else "single process"


def autocast_for(device: torch.device, precision: str):
    """An autocast context factory for evaluation outside an Accelerator."""
    mixed = resolve_precision(precision, device.type)
    if mixed == "no":
        return None
    dtype = torch.float16 if mixed == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device(gpu_backend() or "cpu")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        # MPS keeps no peak; emptying the cache makes the driver's count start from what is alive now.
        torch.mps.empty_cache()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak bytes allocated by tensors. MPS (torch keeps no peak there): what the Metal driver holds for the
    process, the caching allocator's pools included, which keep the blocks the step's peak needed. CPU: the process's
    peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_kind(device: torch.device) -> str:
    """What peak_memory_bytes measured on this device (recorded beside it in run.json)."""
    return {"cuda": "cuda_max_allocated", "mps": "mps_driver_allocated"}.get(device.type, "process_max_rss")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of all the kit's code, so a result can be traced to the code that made it (recorded in run.json and
    results.json). What decides whether a study step is redone is the narrower stage_code_version."""
    digest = hashlib.sha256()
    for directory in CODE_DIRECTORIES:
        for path in sorted((REPO_ROOT / directory).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Code that cannot change a trained weight, a prepared split or a scored number: the model card, the figures, the
# report's statistics, the Hub upload and the trackers only present or ship what a stage made. A stage's code version
# leaves them out (and what only they import), so editing a plot or a bootstrap never retrains or rescores a run;
# tests/test_structure.py edits real code in each and checks that, and that none of them imports torch.
OUTCOME_NEUTRAL_MODULES = frozenset(
    f"studykit.{name}" for name in ("model_card", "figures", "statistics", "hub_upload", "trackers")
)
# The report's product is the presentation itself: its code version keeps the statistics and figures it draws with.
REPORT_STAGE = "studykit.report"


@lru_cache(maxsize=None)
def stage_code_version(entry_module: str) -> str:
    """A hash of what a stage runs: its module and every studykit module it imports, at any depth, without the
    outcome-neutral modules (except for the report) and with docstrings, comments and the help texts of config fields
    left out. Editing the README, a docstring, a figure or the report's code therefore never retrains a run, while a
    change to the loss does."""
    digest = hashlib.sha256()
    for module in sorted(stage_modules(entry_module)):
        digest.update(module.encode())
        digest.update(_code_without_documentation(_module_path(module)).encode())
    return digest.hexdigest()[:12]


def stage_modules(entry_module: str) -> set[str]:
    """The modules stage_code_version hashes for a stage."""
    leave_out = frozenset() if entry_module == REPORT_STAGE else OUTCOME_NEUTRAL_MODULES
    return studykit_imports_closure(entry_module, leave_out)


def _module_path(module: str) -> Path:
    return REPO_ROOT / (module.replace(".", "/") + ".py")


def studykit_imports(module: str) -> set[str]:
    """The studykit modules `module` imports, at the top or inside functions."""
    tree = ast.parse(_module_path(module).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "studykit":
            if node.module == "studykit":
                found.update(
                    f"studykit.{alias.name}" for alias in node.names if _module_path(f"studykit.{alias.name}").exists()
                )
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("studykit."))
    return {name for name in found if _module_path(name).exists()}


def studykit_imports_closure(entry_module: str, leave_out: frozenset[str] = frozenset()) -> set[str]:
    """`entry_module` and the studykit modules it imports at any depth, not following those in `leave_out`."""
    seen, pending = set(), [entry_module]
    while pending:
        module = pending.pop()
        if module not in seen and (module == entry_module or module not in leave_out):
            seen.add(module)
            pending.extend(studykit_imports(module) - seen)
    return seen


def _code_without_documentation(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and _is_string(body[0])
        ):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option" and len(node.args) >= 2:
            node.args[1] = ast.Constant("")  # a config field's help text
        if isinstance(node, ast.keyword) and node.arg == "command_description":
            node.value = ast.Constant("")  # a method's --help description
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "HELP_SECTIONS":
            node.value = ast.Constant(None)  # how --help groups the flags
    return ast.unparse(tree)


def _is_string(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


# Dense fp16/bf16 tensor-core peaks in TFLOP/s (no sparsity), by a part of the name torch.cuda.get_device_name() gives;
# the longest part that matches wins ("A100" over "A10", "L40S" over "L4").
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def device_peak_tflops(device: torch.device, given: Optional[float] = None) -> Optional[float]:
    """One device's peak TFLOP/s for MFU: `given` (--peak-tflops) if set, else looked up by GPU name; None where
    unknown (a CPU)."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [part for part in PEAK_TFLOPS if part in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def model_flops_utilization(
    tokens_per_second: float, flops_per_token: int, peak_tflops: Optional[float], devices: int
) -> Optional[float]:
    """Share of the devices' peak spent on the model's FLOPs (None when the peak is unknown)."""
    return tokens_per_second * flops_per_token / (peak_tflops * 1e12 * devices) if peak_tflops else None
