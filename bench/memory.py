"""Peak memory of a training step: our trainer's step against the usual one, beside the estimate the trainer prints,
for each optimizer.

  studykit          the model as studykit loads it (fused GELU) and studykit.loss (chunked output layer and loss)
  usual setup       the model as transformers loads it, `model(input_ids, labels=...).loss` (full logits)

Both take two optimizer steps on the same full-length batch. On CUDA the peak is torch.cuda.max_memory_allocated; on
a CPU it is every tensor counted while alive (bench/tensor_memory.py), what the same step would hold on a GPU
less the allocator's rounding. Attention dropout is off, as on a CPU SDPA with dropout keeps the score matrices that
CUDA's kernels do not. GPT-2 Medium's steps would take too long to measure on a CPU: there the estimates alone are
printed, for a CUDA GPU, from the model built on the meta device (no weights).

  python bench/memory.py --model small --batch-size 2 --optimizer adamw   # GPT-2 Small on a CPU, about 3 minutes
  python bench/memory.py --model small --batch-size 8            # on a GPU: the defaults, fp16
  python bench/memory.py --model medium --batch-size 8 --gradient-checkpointing --max-gpu-memory-gb 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from tensor_memory import TensorMemoryPeak

from studykit.config import OPTIMIZER_CHOICES, LoraTrainConfig, TrainConfig
from studykit.data import collate
from studykit.errors import UserError
from studykit.loss import batch_nll
from studykit.memory import GIB, estimate_for_model, gib
from studykit.memory_fit import apply_memory_cap
from studykit.modeling import (
    KNOWN_GPT2_SHAPES,
    enable_activation_checkpointing,
    use_fused_gelu,
    wrap_with_lora,
)
from studykit.optimizers import OPTIMIZERS, build_optimizer, check_runs_here
from studykit.runtime import (
    autocast_for,
    default_device,
    precision_name,
    resolve_precision,
)
from studykit.study_plan import CUDA_CONTEXT_BYTES, PLAN_CARD_GIB, estimate_for_plan

SHAPES = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2},
    **{
        name: dict(zip(("n_layer", "n_embd", "n_head"), KNOWN_GPT2_SHAPES[hub_id]))
        for name, hub_id in (("small", "gpt2"), ("medium", "gpt2-medium"))
    },
}
# Shapes whose steps a CPU would take too long to measure (GPT-2 Medium: minutes a step, 6 GB for AdamW alone).
ESTIMATED_ONLY_ON_CPU = {"medium"}
# LoRA as a run gets it by default (studykit.config.LoraTrainConfig).
LORA = {key: getattr(LoraTrainConfig(), key) for key in ("rank", "alpha", "dropout", "target_modules")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        choices=sorted(SHAPES),
        help="GPT-2's vocabulary with this shape, randomly initialised",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp16", "bf16", "fp32"),
        help="auto: fp16 on CUDA, fp32 on a CPU",
    )
    parser.add_argument(
        "--optimizer",
        nargs="+",
        choices=OPTIMIZER_CHOICES,
        default=None,
        help="optimizers to compare (default: every one this device runs)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass"
    )
    parser.add_argument(
        "--max-gpu-memory-gb",
        type=float,
        default=None,
        help=f"GiB of the card to fit (default {PLAN_CARD_GIB}); on CUDA it also caps the allocator, "
        "as training's flag does",
    )
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    return parser.parse_args()


def runnable_optimizers(requested, device_type: str) -> list[str]:
    if requested:
        return requested
    return [name for name in OPTIMIZER_CHOICES if not (OPTIMIZERS[name].cuda_only and device_type != "cuda")]


def build(args, method: str, studykit: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0, **SHAPES[args.model]))
    model.config._attn_implementation = "sdpa"
    if studykit:
        use_fused_gelu(model)
    if method == "lora":
        model = wrap_with_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], LORA["target_modules"])
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def peak_of_two_steps(model, optimizer_name: str, batch, autocast, studykit: bool, device: torch.device) -> int:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": trainable}], TrainConfig(optimizer=optimizer_name, lr=1e-4), device)
    tracker = TensorMemoryPeak(model.parameters()) if device.type == "cpu" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tracker:
        for _ in range(2):
            if studykit:
                loss = batch_nll(model, batch, autocast).total
            else:
                with autocast():
                    loss = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
                    ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else tracker.peak


def fits(size: int, card_gib: float) -> str:
    return "yes" if size + CUDA_CONTEXT_BYTES <= card_gib * GIB else "no"


def print_estimates(args, optimizers: list[str], card_gib: float) -> list[dict]:
    """GPT-2 Medium on a CPU: the trainer's estimate for a CUDA GPU, from the model built on the meta device."""
    from transformers import GPT2Config

    precision = "fp16" if args.precision == "auto" else args.precision
    checkpointing = "with" if args.gradient_checkpointing else "without"
    print(
        f"model: {args.model}, micro-batch {args.batch_size} x {args.seq_len} tokens, precision {precision}, "
        f"{checkpointing} gradient checkpointing"
    )
    print(
        "measuring its steps on a CPU would take too long: these are the estimates for a CUDA GPU, built on the "
        f"meta device (no weights); a card also holds the CUDA context ({gib(CUDA_CONTEXT_BYTES):.2f} GiB)"
    )
    print(
        f"{'method':<8} {'optimizer':<16} {'estimate GiB':>13} {'paged GiB':>10} {'+ context GiB':>14} "
        f"{f'fits {card_gib:g} GiB':>12}"
    )
    model_config = GPT2Config(**SHAPES[args.model])
    rows = []
    for method, config_class, extra in (("full", TrainConfig, {}), ("lora", LoraTrainConfig, LORA)):
        for name in optimizers:
            config = config_class(
                optimizer=name,
                batch_size=args.batch_size,
                precision=precision,
                gradient_checkpointing=args.gradient_checkpointing,
                **extra,
            )
            estimate = estimate_for_plan(config, model_config, args.seq_len)
            row = {
                "method": method,
                "optimizer": name,
                "setup": "studykit",
                "peak_gib": None,
                "estimate_gib": gib(estimate.total),
                "paged_gib": gib(estimate.optimizer_state_paged),
                "fits": fits(estimate.total, card_gib),
            }
            rows.append(row)
            print(
                f"{method:<8} {name:<16} {row['estimate_gib']:>13.2f} {row['paged_gib']:>10.2f} "
                f"{gib(estimate.total + CUDA_CONTEXT_BYTES):>14.2f} {row['fits']:>12}",
                flush=True,
            )
    return rows


def print_measurements(args, device: torch.device, optimizers: list[str], card_gib: float) -> list[dict]:
    for name in optimizers:
        check_runs_here(name, device)
    precision = precision_name(resolve_precision(args.precision, device.type))
    autocast = autocast_for(device, args.precision) or contextlib.nullcontext
    sequences = [list(range(1, args.seq_len + 1))] * args.batch_size
    batch = {key: value.to(device) for key, value in collate(sequences, 0).items()}
    checkpointing = "with" if args.gradient_checkpointing else "without"
    print(
        f"device: {device.type}, model: {args.model}, micro-batch {args.batch_size} x {args.seq_len} tokens, "
        f"precision {precision}, {checkpointing} gradient checkpointing"
    )
    print(
        f"{'method':<8} {'optimizer':<16} {'setup':<14} {'peak GiB':>9} {'estimate GiB':>13} "
        f"{f'fits {card_gib:g} GiB':>12}"
    )
    rows = []
    for method in ("full", "lora"):
        for name in optimizers:
            for setup in ("studykit", "usual setup"):
                row = measured_row(args, method, name, setup, batch, autocast, device)
                rows.append(row)
                if row["peak_gib"] is None:
                    cells = f"{'OOM':>9}"
                else:
                    estimate = f"{row['estimate_gib']:.2f}" if row["estimate_gib"] is not None else ""
                    cells = f"{row['peak_gib']:>9.2f} {estimate:>13} {row['fits']:>12}"
                print(f"{method:<8} {name:<16} {setup:<14} {cells}", flush=True)
    return rows


def measured_row(args, method: str, optimizer_name: str, setup: str, batch, autocast, device: torch.device) -> dict:
    """Peak, estimate (our trainer's setup only) and fit of one case; no peak when it did not fit under the cap."""
    precision = precision_name(resolve_precision(args.precision, device.type))
    model = build(args, method, setup == "studykit").to(device)
    row = {"method": method, "optimizer": optimizer_name, "setup": setup, "peak_gib": None, "estimate_gib": None}
    try:
        peak = peak_of_two_steps(model, optimizer_name, batch, autocast, setup == "studykit", device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "fits": "no"}
    if setup == "studykit":
        estimate = estimate_for_model(
            model, args.batch_size, args.seq_len, precision, args.gradient_checkpointing, device.type, optimizer_name
        )
        row["estimate_gib"] = gib(estimate.total)
    return {**row, "peak_gib": gib(peak), "fits": fits(peak, args.max_gpu_memory_gb or PLAN_CARD_GIB)}


def main() -> None:
    args = parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    device = default_device()
    card_gib = args.max_gpu_memory_gb or PLAN_CARD_GIB
    if device.type == "cpu" and args.model in ESTIMATED_ONLY_ON_CPU:
        rows = print_estimates(args, runnable_optimizers(args.optimizer, "cuda"), card_gib)
    else:
        if device.type == "cuda":
            apply_memory_cap(args.max_gpu_memory_gb, device)
        try:
            rows = print_measurements(args, device, runnable_optimizers(args.optimizer, device.type), card_gib)
        except UserError as error:
            sys.exit(f"error: {error}")
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "json"}
        Path(args.json).write_text(json.dumps({"settings": settings, "device": device.type, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
