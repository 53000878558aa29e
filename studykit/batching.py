"""Batches on their way to the device: lengths padded to GPU-friendly multiples, a step's micro-batches collated before
its forward passes, and on CUDA copied from pinned memory without making the host wait.

Padding never changes a loss: padded positions are masked out of attention and labelled IGNORE_INDEX. What it changes
is the shapes the device sees. On a GPU a length that is a multiple of 64 keeps tensor cores and attention kernels on
their fast tiles, and with --compile the eight widths a 512-token run can take leave torch's compiler few shapes to
see (after the second, it compiles one graph for any length). A CPU gains nothing from padding, so there it is off.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from studykit.data import collate
from studykit.loss import predicted_positions

# --pad-to-multiple-of when none is given, by device type.
DEFAULT_PAD_MULTIPLE = {"cuda": 64, "cpu": 1}


def resolve_pad_multiple(pad_to_multiple_of: Optional[int], device_type: str) -> int:
    """--pad-to-multiple-of, or its default on this device: 64 on CUDA, 1 (no padding) elsewhere."""
    return pad_to_multiple_of if pad_to_multiple_of is not None else DEFAULT_PAD_MULTIPLE.get(device_type, 1)


def padded_width(longest: int, multiple: int, max_width: int) -> int:
    """`longest` rounded up to a multiple of `multiple`, but never past `max_width` (the data's seq_len, which the
    model's context holds) nor below `longest`."""
    return max(longest, min(-(-longest // multiple) * multiple, max_width))


def collate_padded(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    multiple: int,
    max_width: int,
    prompt_lengths: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """A batch padded to `padded_width`, with the positions the loss scores (loss.predicted_positions), found here on
    the host so that the loss never waits for the device to count them. Prompt tokens are never targets (collate)."""
    longest = max(len(ids) for ids in sequences)
    batch = collate(
        sequences, pad_token_id, pad_to=padded_width(longest, multiple, max_width), prompt_lengths=prompt_lengths
    )
    batch["predicted_positions"] = predicted_positions(batch["labels"])
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """On CUDA from pinned memory without blocking: a copy from ordinary memory makes the host wait until the GPU has
    finished all the work queued before it, so each micro-batch would drain the GPU's queue. Elsewhere a plain move
    (on a CPU, nothing is copied)."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def step_batches(
    groups: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    multiple: int,
    max_width: int,
    device: torch.device,
    prompt_length_groups: Optional[Sequence[Sequence[int]]] = None,
) -> list[dict[str, torch.Tensor]]:
    """Every micro-batch of one optimizer step, collated and on its way to the device before the first forward pass:
    the host then queues the step's work without stopping to collate between micro-batches. prompt_length_groups
    gives each group's prompt lengths (None: no prompts)."""
    prompt_length_groups = prompt_length_groups or [None] * len(groups)
    return [
        to_device(collate_padded(group, pad_token_id, multiple, max_width, prompt_lengths), device)
        for group, prompt_lengths in zip(groups, prompt_length_groups)
    ]
