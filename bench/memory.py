"""Peak memory of a training step: our trainer's step against the usual one, beside the estimate the trainer prints.

  studykit          the model as studykit loads it (fused GELU) and studykit.loss (chunked output layer and loss)
  usual setup       the model as transformers loads it, `model(input_ids, labels=...).loss` (full logits)

Both take two AdamW steps on the same full-length batch. On CUDA the peak is torch.cuda.max_memory_allocated; on a
CPU it is every tensor counted while alive (studykit.memory.TensorMemoryPeak), what the same step would hold on a GPU
less the allocator's rounding. Attention dropout is off, as on a CPU SDPA with dropout keeps the score matrices that
CUDA's kernels do not.

  python bench/memory.py --model small --batch-size 2            # GPT-2 Small's shape on a CPU, about 3 minutes
  python bench/memory.py --model small --batch-size 8            # on a GPU: the defaults, fp16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.data import collate  # noqa: E402
from studykit.loss import batch_nll  # noqa: E402
from studykit.memory import TensorMemoryPeak, estimate_for_model, gib  # noqa: E402
from studykit.modeling import use_fused_gelu, wrap_with_lora  # noqa: E402
from studykit.runtime import (  # noqa: E402
    autocast_for,
    default_device,
    precision_name,
    resolve_precision,
)

SHAPES = {"tiny": {"n_layer": 2, "n_embd": 128, "n_head": 2}, "small": {"n_layer": 12, "n_embd": 768, "n_head": 12}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES), help="GPT-2's vocabulary with this shape, randomly initialised")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"), help="auto: fp16 on CUDA, fp32 on a CPU")
    return parser.parse_args()


def build(args, method: str, studykit: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0, **SHAPES[args.model]))
    model.config._attn_implementation = "sdpa"
    if studykit:
        use_fused_gelu(model)
    if method == "lora":
        model = wrap_with_lora(model, 8, 16, 0.05, ["attention"])
    return model.train()


def peak_of_two_steps(model, batch, autocast, studykit: bool, device: torch.device) -> int:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
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
                    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else tracker.peak


def main() -> None:
    args = parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    device = default_device()
    precision = precision_name(resolve_precision(args.precision, device.type))
    autocast = autocast_for(device, args.precision) or contextlib.nullcontext
    batch = {key: value.to(device) for key, value in collate([list(range(1, args.seq_len + 1))] * args.batch_size, 0).items()}
    print(f"device: {device.type}, model: {args.model}, micro-batch {args.batch_size} x {args.seq_len} tokens, precision {precision}")
    print(f"{'method':<8} {'setup':<14} {'peak GiB':>9} {'estimate GiB':>13}")
    for method in ("full", "lora"):
        for setup in ("studykit", "usual setup"):
            model = build(args, method, setup == "studykit").to(device)
            peak = peak_of_two_steps(model, batch, autocast, setup == "studykit", device)
            estimate = ""
            if setup == "studykit":
                estimate = f"{gib(estimate_for_model(model, args.batch_size, args.seq_len, precision, False, device.type).total):.2f}"
            print(f"{method:<8} {setup:<14} {gib(peak):>9.2f} {estimate:>13}", flush=True)
            del model


if __name__ == "__main__":
    main()
