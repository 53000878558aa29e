"""A run's memory at training time: the --max-gpu-memory-gb cap, the largest micro-batch that fits (--auto-batch: a
real step on CUDA, the estimate on a CPU), and an out-of-memory error turned into one sentence that says what to
try. The estimate itself is studykit/memory.py's."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch

from studykit import loss
from studykit.data import collate
from studykit.errors import UserError
from studykit.memory import GIB, MEMORY_FLAGS, MemoryEstimate, estimate_for_model, gib
from studykit.runtime import precision_name


def apply_memory_cap(max_gpu_memory_gb: Optional[float], device: torch.device, say=print) -> Optional[int]:
    """Limit this process's CUDA allocator to the cap; returns the cap in bytes (None when off)."""
    if max_gpu_memory_gb is None:
        return None
    cap = int(max_gpu_memory_gb * GIB)
    if device.type != "cuda":
        say(
            f"note: --max-gpu-memory-gb {max_gpu_memory_gb:g} only applies to CUDA; on {device.type} it only guides "
            "--auto-batch."
        )
        return cap
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    say(f"GPU memory capped at {max_gpu_memory_gb:g} GiB ({fraction:.1%} of {gib(total):.1f} GiB)")
    return cap


def smaller_micro_batch(batch_size: int, effective_batch: int) -> Optional[int]:
    """The next micro-batch to try: about half, and a divisor of the effective batch so that it is kept exactly."""
    for candidate in range(batch_size // 2, 0, -1):
        if effective_batch % candidate == 0:
            return candidate
    return None


def with_micro_batch(config, batch_size: int):
    """The same config with another micro-batch; gradient accumulation grows so the effective batch is unchanged."""
    return dataclasses.replace(config, batch_size=batch_size, grad_accum=config.effective_batch // batch_size)


def largest_fitting_by_estimate(config, estimate_at, cap: Optional[int]) -> int:
    """CPU: the largest micro-batch whose estimate is within the cap (the configured one when there is no cap)."""
    batch_size = config.batch_size
    while cap is not None and estimate_at(batch_size).total > cap:
        smaller = smaller_micro_batch(batch_size, config.effective_batch)
        if smaller is None:
            break
        batch_size = smaller
    return batch_size


def probe_fits(model, accelerator, sequence: list[int], batch_size: int, reserved_bytes: int) -> bool:
    """One forward and backward pass at the longest length, with the optimizer state's memory held aside."""
    batch = {key: value.to(accelerator.device) for key, value in collate([sequence] * batch_size, 0).items()}
    try:
        # The probe must not move the run's random streams (dropout), so the run is the same with or without it.
        device = accelerator.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            reserve = torch.empty(reserved_bytes, dtype=torch.uint8, device=accelerator.device)
            with accelerator.no_sync(model):
                loss.batch_nll(model, batch, accelerator.autocast).total.backward()
            del reserve
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def largest_fitting_by_probe(config, model, accelerator, longest_sequence: list[int], optimizer_bytes: int) -> int:
    """CUDA: halve the micro-batch until a real step at the longest length fits; every process agrees on the
    smallest."""
    batch_size = config.batch_size
    while not probe_fits(model, accelerator, longest_sequence, batch_size, optimizer_bytes):
        smaller = smaller_micro_batch(batch_size, config.effective_batch)
        if smaller is None:
            raise UserError(
                f"even a micro-batch of {batch_size} sequences of {len(longest_sequence)} tokens runs out of GPU "
                "memory; use --gradient-checkpointing, LoRA, or a larger --max-gpu-memory-gb."
            )
        batch_size = smaller
    chosen = accelerator.gather(torch.tensor([batch_size], device=accelerator.device))
    return int(chosen.min())


def plan_memory(config, model, accelerator, longest_sequence: list[int]) -> tuple[Any, dict[str, Any]]:
    """Cap memory, pick the micro-batch (--auto-batch), print the estimate; returns the config to train with and
    the record for run.json."""
    seq_len = len(longest_sequence)
    precision = precision_name(accelerator.mixed_precision)

    def estimate_at(batch_size: int) -> MemoryEstimate:
        return estimate_for_model(
            accelerator.unwrap_model(model),
            batch_size,
            seq_len,
            precision,
            config.gradient_checkpointing,
            accelerator.device.type,
            config.optimizer,
        )

    cap = apply_memory_cap(config.max_gpu_memory_gb, accelerator.device, accelerator.print)
    requested = (config.batch_size, config.grad_accum)
    if config.auto_batch:
        if accelerator.device.type == "cuda":
            batch_size = largest_fitting_by_probe(
                config, model, accelerator, longest_sequence, estimate_at(config.batch_size).optimizer_state
            )
        else:
            batch_size = largest_fitting_by_estimate(config, estimate_at, cap)
        config = with_micro_batch(config, batch_size)
        accelerator.print(
            f"--auto-batch: micro-batch {config.batch_size} x grad-accum {config.grad_accum} "
            f"(asked for {requested[0]} x {requested[1]}; the effective batch {config.effective_batch} is kept)"
        )
    estimate = estimate_at(config.batch_size)
    accelerator.print(estimate.describe())
    if cap is not None and estimate.total > cap:
        accelerator.print(
            f"warning: the estimate ({gib(estimate.total):.2f} GiB) exceeds --max-gpu-memory-gb; if the run "
            f"runs out of memory, try {MEMORY_FLAGS}."
        )
    record = {
        "estimate": estimate.to_dict(),
        "max_gpu_memory_gb": config.max_gpu_memory_gb,
        "auto_batch": config.auto_batch,
        "requested_batch_size": requested[0],
        "requested_grad_accum": requested[1],
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
    }
    return config, record


@contextlib.contextmanager
def out_of_memory_as_user_error(estimate: Optional[dict[str, Any]]) -> Iterator[None]:
    """A CUDA out-of-memory error during training becomes one sentence with the estimate and what to try."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        expected = (
            f"the estimate for this setting was {gib(estimate['total']):.2f} GiB at micro-batch "
            f"{estimate['micro_batch']}; "
            if estimate
            else ""
        )
        raise UserError(f"the GPU ran out of memory; {expected}try {MEMORY_FLAGS}.") from None
