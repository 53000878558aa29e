"""Token-level negative log-likelihood and perplexity, summed over tokens, never averaged over batches."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from studykit.batching import collate_padded, padded_width, resolve_pad_multiple, to_device
from studykit.data import IGNORE_INDEX, length_sorted_batches
from studykit.loss import batch_nll


def predicted_tokens_per_sequence(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


@dataclass
class SequenceScores:
    """Per-response NLL sums and predicted-token counts, in the order of the input sequences."""

    nll_sums: np.ndarray
    token_counts: np.ndarray

    @property
    def nll_sum(self) -> float:
        return float(self.nll_sums.sum())

    @property
    def tokens(self) -> int:
        return int(self.token_counts.sum())

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll_sum, self.tokens)


@torch.no_grad()
def score_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    device: torch.device,
    pad_token_id: int,
    autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    batch_indices: Optional[Sequence[Sequence[int]]] = None,
    progress: Optional[Callable] = None,
    pad_to_multiple_of: Optional[int] = None,
    prompt_lengths: Optional[Sequence[int]] = None,
) -> SequenceScores:
    """Score every sequence in length-sorted batches (little padding; the sums do not depend on batching).

    A sequence's first prompt_lengths[i] tokens (default: none) condition the rest but are not scored: its NLL and
    token count are those of its response and EOS alone.

    `batch_indices` restricts scoring to some batches (one process's share under DDP); unscored rows stay 0. Batches
    are padded to a multiple of `pad_to_multiple_of` (default: the device's, batching.resolve_pad_multiple), never
    wider than the longest sequence; padding never counts.
    """
    was_training = model.training
    model.eval()
    nll_sums = np.zeros(len(sequences), dtype=np.float64)
    token_counts = np.zeros(len(sequences), dtype=np.int64)
    multiple = resolve_pad_multiple(pad_to_multiple_of, device.type)
    longest = max((len(ids) for ids in sequences), default=0)
    # Batches are cut by padded width, so that none holds more padded positions than the first.
    widths = [padded_width(len(ids), multiple, longest) for ids in sequences]
    batches = batch_indices if batch_indices is not None else length_sorted_batches(widths, batch_size)
    if progress is not None:
        batches = progress(batches)
    for indices in batches:
        prompts = [prompt_lengths[i] for i in indices] if prompt_lengths is not None else None
        batch = collate_padded([sequences[i] for i in indices], pad_token_id, multiple, longest, prompts)
        batch = to_device(batch, device)
        nll_sums[list(indices)] = batch_nll(model, batch, autocast or contextlib.nullcontext).per_sequence.cpu().numpy()
        token_counts[list(indices)] = predicted_tokens_per_sequence(batch["labels"]).cpu().numpy()
    model.train(was_training)
    return SequenceScores(nll_sums, token_counts)
