"""Token-level negative log-likelihood and perplexity, summed over tokens, never averaged over batches."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from studykit.data import IGNORE_INDEX, collate, length_sorted_batches


def token_nll_per_sequence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL for each row; positions labelled IGNORE_INDEX (padding) contribute nothing.

    The labels are shifted, not the logits: slicing off the last position would copy the whole
    batch x length x vocabulary tensor (the largest one of the step) before the loss reads it.
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        next_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(labels.shape).sum(dim=1)


# Evaluation computes logits for this many predicted positions at a time: the batch x length x vocabulary tensor
# (1.6 GB in fp32 for 16 x 512 x 50,257) never exists, which keeps validation inside a 6 GB card and off the
# allocator's slow path on a CPU.
LOGIT_CHUNK_TOKENS = 1024


def _output_head(model):
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None


def nll_per_sequence_chunked(model, batch: dict[str, torch.Tensor], autocast_context) -> torch.Tensor:
    """Per-row NLL sums with the output layer applied only at predicted (non-padding) positions, in chunks.

    The model runs with `logits_to_keep=1` and returns its final, normalised hidden states; the output head is then
    applied to the positions that have a target. Falls back to full logits for a model without an output head.
    """
    head = _output_head(model)
    if head is None:
        with autocast_context():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_nll_per_sequence(logits, batch["labels"])
    with autocast_context():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, logits_to_keep=1)
    next_labels = batch["labels"][:, 1:]
    has_target = next_labels != IGNORE_INDEX
    rows = has_target.nonzero()[:, 0]
    hidden, targets = outputs.hidden_states[-1][:, :-1][has_target], next_labels[has_target]
    nll = torch.zeros(next_labels.size(0), dtype=torch.float64, device=next_labels.device)
    for start in range(0, targets.numel(), LOGIT_CHUNK_TOKENS):
        chunk = slice(start, start + LOGIT_CHUNK_TOKENS)
        with autocast_context():
            logits = head(hidden[chunk])
        nll.index_add_(0, rows[chunk], F.cross_entropy(logits.float(), targets[chunk], reduction="none").double())
    return nll


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
) -> SequenceScores:
    """Score every sequence in length-sorted batches (little padding; the sums do not depend on batching).

    `batch_indices` restricts scoring to some batches (one process's share under DDP); unscored rows stay 0.
    """
    was_training = model.training
    model.eval()
    nll_sums = np.zeros(len(sequences), dtype=np.float64)
    token_counts = np.zeros(len(sequences), dtype=np.int64)
    batches = batch_indices if batch_indices is not None else length_sorted_batches([len(s) for s in sequences], batch_size)
    if progress is not None:
        batches = progress(batches)
    for indices in batches:
        batch = collate([sequences[i] for i in indices], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        nll_sums[list(indices)] = nll_per_sequence_chunked(model, batch, autocast or contextlib.nullcontext).cpu().numpy()
        token_counts[list(indices)] = predicted_tokens_per_sequence(batch["labels"]).cpu().numpy()
    model.train(was_training)
    return SequenceScores(nll_sums, token_counts)
