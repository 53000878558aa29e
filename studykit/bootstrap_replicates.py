"""The kit's two-level bootstrap (seeds, then conversation trees; studykit.statistics) as raw replicates, for the
analysis: contributions that must add up and a verdict read at 90% need the replicates, not a 95% interval.

These live apart from statistics.py on purpose: statistics.py is in the training code's import closure (through the
figures), so any change to it would give every training a new code version and retrain every study.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from studykit.statistics import MIN_TREES_FOR_INTERVAL, _per_response_arrays, _replicates, _unchanged


def seeds_and_trees_replicates(
    values_by_seed: np.ndarray, tokens: np.ndarray, tree_ids: Sequence, resamples: int, seed: int
) -> Optional[np.ndarray]:
    """Bootstrap replicates of the mean over drawn seeds of sum(values) / sum(tokens) over drawn trees: the draws of
    statistics.seeds_and_trees and paired_ratio_seeds_and_trees (the same seed argument draws the same seeds and trees
    for any values of the same shape), None under MIN_TREES_FOR_INTERVAL trees. Replicates of two quantities drawn
    with one seed argument are paired, so their sums and ratios are replicates too."""
    values_by_seed, tokens, tree_of_response, tree_count = _per_response_arrays(values_by_seed, tokens, tree_ids)
    if tree_count < MIN_TREES_FOR_INTERVAL:
        return None
    return _replicates(values_by_seed, tokens, tree_of_response, tree_count, _unchanged, resamples, seed)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` percentile interval of bootstrap replicates (NaN replicates, from a resample whose
    denominator is zero, are left out)."""
    tail = 100 * (1 - confidence) / 2
    finite = replicates[np.isfinite(replicates)]
    if not len(finite):
        return math.nan, math.nan
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)
