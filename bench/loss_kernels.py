"""The loss kernels side by side: studykit.loss's chunked output layer, torch's linear_cross_entropy (chunked) and,
on CUDA with liger-kernel installed, Liger's, against the full-logits cross-entropy they all replace.

    python bench/loss_kernels.py                          # GPT-2 Small's output layer, 2,048 positions, CPU, ~3 min
    python bench/loss_kernels.py --positions 4088         # on a GPU: the defaults' micro-batch (8 x 511 targets)

Each kernel is timed on the same final hidden states and targets in three modes: training with every gradient (full
fine-tuning: the hidden states' and the tied output weights'), training with the hidden states' gradient only (LoRA:
the output layer is frozen) and evaluation (no gradients, the per-position NLL evaluation sums). Timings are the best of
--repeats alternating passes. Peak memory is what the kernel allocates above its inputs: on CUDA the allocator's
peak; on a CPU the peak resident set of a fresh process that runs that one case (torch's kernel is a custom op whose
temporaries a tensor-counting mode cannot see). Every kernel's loss and gradients are compared with the full
logits' in fp64.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from studykit.errors import UserError
from studykit.loss import output_layer_nll, resolve_loss_kernel, torch_has_fused_loss

MODES = {
    "train, all gradients": (True, True),
    "train, hidden gradient only": (True, False),
    "evaluation": (False, False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048, help="predicted positions in the batch")
    parser.add_argument("--width", type=int, default=768, help="hidden size (768: GPT-2 Small)")
    parser.add_argument("--vocab", type=int, default=50257, help="output classes (50,257: GPT-2)")
    parser.add_argument("--precision", default="fp32", choices=sorted(DTYPES), help="compute dtype of the output layer")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per kernel and mode (the best counts)")
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["full logits", "studykit", "torch", "liger"],
        help="what to compare; one this machine cannot run is reported as skipped",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--memory-case", nargs=2, metavar=("KERNEL", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(args, dtype=torch.float32):
    """GPT-2's final hidden states are LayerNorm outputs (about unit scale); its tied output weights are ~N(0, 0.02)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, args.width, generator=generator, dtype=dtype)
    weight = torch.randn(args.vocab, args.width, generator=generator, dtype=dtype).mul_(0.02)
    targets = torch.randint(0, args.vocab, (args.positions,), generator=generator)
    return hidden.to(device()), weight.to(device()), targets.to(device())


def full_logits_nll(hidden, weight, targets, compute_dtype, needs_hidden_grad, needs_weight_grad):
    """The usual computation: every logit at once, cross-entropy in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T).float()
    nll = F.cross_entropy(logits, targets, reduction="none")
    return nll.sum(), nll.detach()


def run_case(kernel: str, mode: str, hidden, weight, targets, compute_dtype):
    """One forward (and backward) pass; returns the total, the gradients and the per-position NLL (or None)."""
    needs_grad, weight_grad = MODES[mode]
    hidden = hidden.detach().requires_grad_(needs_grad)
    weight = weight.detach().requires_grad_(weight_grad)
    with torch.set_grad_enabled(needs_grad):
        if kernel == "full logits":
            total, nll = full_logits_nll(hidden, weight, targets, compute_dtype, needs_grad, weight_grad)
        else:
            total, nll = output_layer_nll(
                kernel, hidden, weight, targets, compute_dtype, needs_grad, needs_grad and weight_grad
            )
    if needs_grad:
        total.backward()
    return total.detach(), hidden.grad, weight.grad, nll


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def available(kernel: str) -> str | None:
    """Why a kernel cannot run here, or None."""
    if kernel == "full logits":
        return None
    try:
        resolve_loss_kernel(kernel, device().type)
    except UserError as error:
        return str(error)
    return None


def time_kernels(args, kernels: list[str]) -> dict[tuple[str, str], float]:
    hidden, weight, targets = inputs(args)
    compute_dtype = DTYPES[args.precision]
    best: dict[tuple[str, str], float] = {}
    for mode in MODES:
        for kernel in kernels:  # a first pass each, untimed: kernel selection, allocator
            run_case(kernel, mode, hidden, weight, targets, compute_dtype)
        for _ in range(args.repeats):
            for kernel in kernels:  # alternating, so a neighbour's burst on a shared machine hits each kernel alike
                sync()
                started = time.perf_counter()
                run_case(kernel, mode, hidden, weight, targets, compute_dtype)
                sync()
                best[kernel, mode] = min(best.get((kernel, mode), math.inf), time.perf_counter() - started)
    return best


def agreement(args, kernels: list[str]) -> dict[str, dict[str, float]]:
    """Each kernel's loss, per-position NLL and gradients against the full logits computed in fp64."""
    hidden, weight, targets = inputs(args)
    compute_dtype = DTYPES[args.precision]
    reference_total, reference_hidden, reference_weight, _ = run_case(
        "full logits", "train, all gradients", hidden.double(), weight.double(), targets, torch.float64
    )
    _, _, _, reference_nll = run_case(
        "full logits", "evaluation", hidden.double(), weight.double(), targets, torch.float64
    )
    found = {}
    for kernel in kernels:
        total, grad_hidden, grad_weight, _ = run_case(
            kernel, "train, all gradients", hidden, weight, targets, compute_dtype
        )
        _, _, _, nll = run_case(kernel, "evaluation", hidden, weight, targets, compute_dtype)
        found[kernel] = {
            "loss": abs(float(total) / float(reference_total) - 1),
            "per_position_nll": float((nll.double() - reference_nll).abs().max() / reference_nll.abs().max()),
            "hidden_gradient": float((grad_hidden.double() - reference_hidden).norm() / reference_hidden.norm()),
            "weight_gradient": float((grad_weight.double() - reference_weight).norm() / reference_weight.norm()),
        }
    return found


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, from Linux's /proc/self/status."""
    with open("/proc/self/status") as stream:
        line = next(line for line in stream if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_resident() -> None:
    """Linux: restart VmHWM from the current resident set (a fresh process's starts from its parent's at fork)."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")


def peak_bytes_here(args, kernel: str, mode: str) -> int:
    """What one case allocates above its inputs, in this process."""
    hidden, weight, targets = inputs(args)
    compute_dtype = DTYPES[args.precision]
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_case(kernel, mode, hidden, weight, targets, compute_dtype)
        sync()
        return torch.cuda.max_memory_allocated() - before
    # A first call on a few positions: lazy imports, thread pools and the BLAS's buffers are not the kernel's peak.
    run_case(kernel, mode, hidden[:16], weight, targets[:16], compute_dtype)
    reset_peak_resident()
    before = status_bytes("VmRSS")
    run_case(kernel, mode, hidden, weight, targets, compute_dtype)
    return max(0, status_bytes("VmHWM") - before)


def peak_bytes(args, kernel: str, mode: str) -> int:
    """On CUDA in this process; on a CPU in a fresh one, whose peak resident set only this case can have set."""
    if torch.cuda.is_available():
        return peak_bytes_here(args, kernel, mode)
    command = [
        sys.executable,
        __file__,
        "--positions",
        str(args.positions),
        "--width",
        str(args.width),
        "--vocab",
        str(args.vocab),
        "--precision",
        args.precision,
        "--memory-case",
        kernel,
        mode,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_case:
        print(peak_bytes_here(args, *args.memory_case))
        return {}
    skipped = {kernel: reason for kernel in args.kernels if (reason := available(kernel))}
    kernels = [kernel for kernel in args.kernels if kernel not in skipped]
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {where}, torch {torch.__version__}, output layer {args.vocab:,} x {args.width}, {args.positions:,} "
        f"positions, {args.precision}; torch's linear_cross_entropy {'present' if torch_has_fused_loss() else 'absent'}"
    )
    for kernel, reason in skipped.items():
        print(f"skipped {kernel}: {reason}")
    seconds = time_kernels(args, kernels)
    memory = {(kernel, mode): peak_bytes(args, kernel, mode) for mode in MODES for kernel in kernels}
    errors = agreement(args, [kernel for kernel in kernels if kernel != "full logits"])
    print()
    header = f"{'mode':<28} {'kernel':<12} {'seconds':>8} {'positions/s':>12} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for mode in MODES:
        for kernel in kernels:
            print(
                f"{mode:<28} {kernel:<12} {seconds[kernel, mode]:>8.3f} "
                f"{args.positions / seconds[kernel, mode]:>12,.0f} {memory[kernel, mode] / 2**20:>9.0f}"
            )
    print()
    print(
        "relative error against full logits in fp64: loss, per-position NLL (max), hidden and weight gradients (norm)"
    )
    for kernel, found in errors.items():
        print(f"  {kernel:<12} " + "  ".join(f"{name} {value:.1e}" for name, value in found.items()))
    results = {
        "device": where,
        "torch": torch.__version__,
        "positions": args.positions,
        "width": args.width,
        "vocab": args.vocab,
        "precision": args.precision,
        "skipped": skipped,
        "errors": errors,
        "cases": [
            {"mode": mode, "kernel": kernel, "seconds": seconds[kernel, mode], "peak_bytes": memory[kernel, mode]}
            for mode in MODES
            for kernel in kernels
        ],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
