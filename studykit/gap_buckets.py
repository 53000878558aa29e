"""Where the test-NLL gap between a LoRA run and full fine-tuning sits: the gap split into token buckets that add up
exactly to it, as pure functions of per-response, per-bucket NLL sums.

A bucket family sorts every scored test token into one bucket: by how often the token it predicts occurs as a target
in the *training* split (decades, plus never seen), by its position in the response, by the response's length
(quartiles of the training responses' lengths). Every edge comes from the training split or is fixed, so nothing here
is chosen on the test split.

The gap of run L to full FT F is (sum NLL_L - sum NLL_F) / all test tokens, nats per token (its exp is the perplexity
ratio). A bucket's contribution has the same denominator, so the contributions of one family add up to the gap.
Recovery in a bucket is how much of full FT's gain over the base model (B) LoRA makes there: sum(NLL_B - NLL_L) /
sum(NLL_B - NLL_F) over the bucket's tokens and the seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from studykit.bootstrap_replicates import percentile_interval, seeds_and_trees_replicates
from studykit.statistics import CONFIDENCE

# Position buckets (1-based position of the target in the response): the opening tokens, where the response's
# register is set, apart from the body.
POSITION_EDGES = (16, 64, 256)


@dataclass
class BucketFamily:
    """One way of sorting tokens: a bucket index for every target of every response, and the buckets' labels."""

    name: str
    labels: list[str]
    # Per response, the bucket of each of its targets (int64, same length as the response's targets).
    buckets: list[np.ndarray]


def training_target_counts(targets: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    """How often each token id is a target in the training split."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for response in targets:
        counts += np.bincount(response, minlength=vocab_size)[:vocab_size]
    return counts


def decade_label(decade: int) -> str:
    low, high = 10**decade, 10 ** (decade + 1) - 1
    return f"seen {low:,}-{high:,}x"


def frequency_family(targets: Sequence[np.ndarray], train_counts: np.ndarray) -> BucketFamily:
    """Buckets by the target's count in the training split: never seen, then log-spaced decades (1-9, 10-99, ...)."""
    top_decade = int(math.floor(math.log10(max(int(train_counts.max()), 1))))
    buckets = []
    for response in targets:
        counts = train_counts[response]
        decade = np.floor(np.log10(np.maximum(counts, 1))).astype(np.int64)
        buckets.append(np.where(counts == 0, 0, 1 + decade))
    labels = ["never seen in training"] + [decade_label(decade) for decade in range(top_decade + 1)]
    return BucketFamily("token_frequency", labels, buckets)


def edge_labels(edges: Sequence[int], unit: str) -> list[str]:
    """Labels of the integer ranges 1..e0, e0+1..e1, ..., past the last edge."""
    lows = [1] + [edge + 1 for edge in edges]
    highs = list(edges) + [None]
    return [f"{low}-{high} {unit}" if high is not None else f"{low}+ {unit}" for low, high in zip(lows, highs)]


def position_family(targets: Sequence[np.ndarray], edges: Sequence[int] = POSITION_EDGES) -> BucketFamily:
    """Buckets by the target's 1-based position in its response."""
    buckets = [np.searchsorted(np.asarray(edges), np.arange(1, len(response) + 1), side="left") for response in targets]
    return BucketFamily("position_in_response", edge_labels(edges, "tokens in"), buckets)


def length_edges(train_lengths: Sequence[int]) -> list[int]:
    """Quartiles of the training responses' target counts, as distinct integer edges."""
    quartiles = np.percentile(np.asarray(train_lengths), [25, 50, 75])
    return sorted({int(edge) for edge in quartiles})


def length_family(targets: Sequence[np.ndarray], edges: Sequence[int]) -> BucketFamily:
    """Buckets by the length (scored tokens) of the whole response each target belongs to."""
    buckets = [
        np.full(len(response), int(np.searchsorted(np.asarray(edges), len(response), side="left")), dtype=np.int64)
        for response in targets
    ]
    return BucketFamily("response_length", edge_labels(edges, "token responses"), buckets)


def bucket_sums(values: Sequence[np.ndarray], family: BucketFamily) -> np.ndarray:
    """Per response, the sum of `values` (one per target, e.g. NLL) in each bucket: shape (responses, buckets)."""
    sums = np.zeros((len(values), len(family.labels)), dtype=np.float64)
    for row, (response, buckets) in enumerate(zip(values, family.buckets)):
        sums[row] = np.bincount(buckets, weights=np.asarray(response, dtype=np.float64), minlength=len(family.labels))
    return sums


def bucket_tokens(family: BucketFamily) -> np.ndarray:
    return bucket_sums([np.ones(len(buckets)) for buckets in family.buckets], family)


@dataclass
class BucketGap:
    bucket: str
    gap_contribution: float  # nats per test token; a family's contributions add up to the total gap
    tokens: int
    token_share: float
    gap_per_token: Optional[float]  # the gap within the bucket: contribution / share
    recovery: Optional[float]  # LoRA's share of full FT's gain over the base in this bucket
    interval: Optional[tuple[float, float]]  # of gap_contribution
    recovery_interval: Optional[tuple[float, float]]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator != 0 else None


def decompose_gap(
    run_sums: np.ndarray,
    reference_sums: np.ndarray,
    base_sums: np.ndarray,
    tokens: np.ndarray,
    tree_ids: Sequence,
    labels: Sequence[str],
    resamples: int,
    seed: int,
) -> tuple[float, list[BucketGap]]:
    """The total gap (mean over seeds) and each bucket's part of it.

    run_sums and reference_sums are (seeds, responses, buckets), row s of each trained with seed s; base_sums and
    tokens are (responses, buckets). Intervals are CONFIDENCE percentile intervals of the two-level bootstrap of
    seeds and conversation trees (bootstrap_replicates.seeds_and_trees_replicates), the same draws for every bucket."""
    run_sums, reference_sums = np.asarray(run_sums, np.float64), np.asarray(reference_sums, np.float64)
    response_tokens = tokens.sum(axis=1)
    total_tokens = response_tokens.sum()
    difference = run_sums - reference_sums  # (seeds, responses, buckets)
    total_gap = float(difference.sum(axis=(1, 2)).mean() / total_tokens)
    rows = []
    for index, label in enumerate(labels):
        bucket_difference = difference[:, :, index]
        contribution = float(bucket_difference.sum(axis=1).mean() / total_tokens)
        run_gain = base_sums[None, :, index] - run_sums[:, :, index]
        reference_gain = base_sums[None, :, index] - reference_sums[:, :, index]
        count = int(tokens[:, index].sum())
        interval = recovery_interval = None
        replicates = seeds_and_trees_replicates(bucket_difference, response_tokens, tree_ids, resamples, seed)
        if replicates is not None:
            interval = percentile_interval(replicates, CONFIDENCE)
            run_replicates = seeds_and_trees_replicates(run_gain, response_tokens, tree_ids, resamples, seed)
            reference_replicates = seeds_and_trees_replicates(
                reference_gain, response_tokens, tree_ids, resamples, seed
            )
            with np.errstate(divide="ignore", invalid="ignore"):
                recovery_interval = percentile_interval(run_replicates / reference_replicates, CONFIDENCE)
            if any(math.isnan(value) for value in recovery_interval):
                recovery_interval = None
        rows.append(
            BucketGap(
                bucket=label,
                gap_contribution=contribution,
                tokens=count,
                token_share=count / total_tokens,
                gap_per_token=_ratio(float(bucket_difference.sum(axis=1).mean()), count),
                recovery=_ratio(float(run_gain.sum()), float(reference_gain.sum())),
                interval=interval,
                recovery_interval=recovery_interval,
            )
        )
    return total_gap, rows


def largest_bucket(rows: Sequence[BucketGap]) -> Optional[BucketGap]:
    """The bucket holding the largest part of the gap (by contribution, in the gap's direction)."""
    if not rows:
        return None
    total = sum(row.gap_contribution for row in rows)
    return max(rows, key=lambda row: row.gap_contribution if total >= 0 else -row.gap_contribution)
