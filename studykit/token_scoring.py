"""Next-token NLL of every scored token of held-out responses: what the gap decomposition splits into buckets.

The same forward pass and output-layer kernel as evaluation (loss.batch_nll): the final hidden states at the
positions that have a target, then the model's loss kernel, which returns each position's NLL when no gradient is
taken. Padding is never a target; EOS is; prompt tokens (--context parent) condition the response and are never
scored.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from studykit.batching import collate_padded, padded_width, resolve_pad_multiple, to_device
from studykit.data import IGNORE_INDEX, length_sorted_batches, predicted_tokens
from studykit.loss import loss_kernel_of, output_layer, output_layer_nll


def response_targets(sequence: Sequence[int], prompt_length: int) -> np.ndarray:
    """The token ids a response's scored positions predict, in order: every token after the prompt (without a prompt,
    every token but the first)."""
    return np.asarray(sequence[max(1, prompt_length) :], dtype=np.int64)


@torch.no_grad()
def batch_token_nll(model, batch: dict[str, torch.Tensor], autocast_context: Callable) -> torch.Tensor:
    """Each target position's NLL (fp32), in row order then position order, as loss.batch_nll computes it."""
    labels = batch["labels"]
    positions = batch["predicted_positions"]
    head = output_layer(model)
    with autocast_context():
        if head is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            flat = _full_logits_nll(logits, labels)
            return flat.reshape(-1).index_select(0, positions).float()
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
        )
        final_hidden = outputs.hidden_states[-1]
        hidden = final_hidden.reshape(-1, final_hidden.size(-1)).index_select(0, positions)
        targets = labels.reshape(-1).index_select(0, positions + 1)
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        _, nll = output_layer_nll(loss_kernel_of(model), hidden, head.weight, targets, compute_dtype, False, False)
    return nll.float()


def _full_logits_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL from full logits, position p scored against the label at p + 1 (0 where that is ignored)."""
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        next_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(labels.shape)


def score_tokens(
    model,
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    device: torch.device,
    pad_token_id: int,
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    pad_to_multiple_of: Optional[int] = None,
    prompt_lengths: Optional[Sequence[int]] = None,
) -> list[np.ndarray]:
    """Per response, the NLL (float64) of each of its targets (response_targets), in the order of `sequences`."""
    was_training = model.training
    model.eval()
    prompts = list(prompt_lengths) if prompt_lengths is not None else [0] * len(sequences)
    scores: list[Optional[np.ndarray]] = [None] * len(sequences)
    multiple = resolve_pad_multiple(pad_to_multiple_of, device.type)
    longest = max((len(ids) for ids in sequences), default=0)
    widths = [padded_width(len(ids), multiple, longest) for ids in sequences]
    for indices in length_sorted_batches(widths, batch_size):
        batch = collate_padded(
            [sequences[i] for i in indices], pad_token_id, multiple, longest, [prompts[i] for i in indices]
        )
        nll = batch_token_nll(model, to_device(batch, device), autocast or contextlib.nullcontext)
        values = nll.double().cpu().numpy()
        start = 0
        # predicted_positions lists each row's targets in order, rows in batch order.
        for i in indices:
            count = predicted_tokens(len(sequences[i]), prompts[i])
            scores[i] = values[start : start + count]
            start += count
    model.train(was_training)
    return scores
