"""Bootstrap intervals over held-out texts: a perplexity's, and a paired ratio's between two models scored on the same
texts. Pure functions of per-text NLL sums and token counts."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95

# Below this many texts a bootstrap "interval" only lists the few texts' own perplexities; none is given.
MIN_TEXTS_FOR_INTERVAL = 20

# Bootstrap resamples are drawn this many at a time, so memory stays at CHUNK x responses indices.
BOOTSTRAP_CHUNK = 200


def _resampled_sums(columns: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Sums of each column over `resamples` bootstrap resamples of the rows (responses), one row of sums per column.
    The same seed draws the same resamples, so every run is resampled on the same responses."""
    rng = np.random.default_rng(seed)
    count = len(columns[0])
    sums = np.empty((len(columns), resamples))
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, resamples - start)
        indices = rng.integers(0, count, size=(size, count))
        for column, values in enumerate(columns):
            sums[column, start : start + size] = np.asarray(values, dtype=np.float64)[indices].sum(axis=1)
    return sums


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, resamples: int,
                        seed: int) -> Optional[tuple[float, float]]:
    """95% interval of the token-weighted perplexity exp(sum NLL / sum tokens), resampling whole responses
    (None for fewer than MIN_TEXTS_FOR_INTERVAL)."""
    if len(nll) < MIN_TEXTS_FOR_INTERVAL:
        return None
    nll_sums, token_sums = _resampled_sums([nll, tokens], resamples, seed)
    return _percentile_interval(np.exp(nll_sums / token_sums))


def paired_ratio(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray, resamples: int,
                 seed: int) -> dict[str, Optional[float]]:
    """Perplexity ratio of a model to a reference scored on the same responses, with a paired bootstrap interval:
    each resample takes the same responses for both, so what the two share (hard responses) cancels."""
    difference = np.asarray(nll, dtype=np.float64) - np.asarray(reference_nll, dtype=np.float64)
    ratio = math.exp(difference.sum() / np.sum(tokens))
    if len(difference) < MIN_TEXTS_FOR_INTERVAL:
        return {"ratio": ratio, "ci_low": None, "ci_high": None}
    difference_sums, token_sums = _resampled_sums([difference, tokens], resamples, seed)
    low, high = _percentile_interval(np.exp(difference_sums / token_sums))
    return {"ratio": ratio, "ci_low": low, "ci_high": high}
