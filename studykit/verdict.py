"""The answer to "is this LoRA run as good as full fine-tuning?", in words, from two one-sided tests.

The margin m is fixed in the study file ([report] equivalence_margin) before any result is seen. A run's test
perplexity ratio to full FT (seed-paired, geometric mean over seeds) has a 90% interval from the two-level bootstrap
of seeds and conversation trees; a 90% interval is what two one-sided tests at 5% each read (Schuirmann 1987):
- equivalent: the interval lies inside (1/(1+m), 1+m), so both one-sided tests reject a difference beyond m;
- non-inferior: the interval lies below 1+m but reaches 1/(1+m) or below (no worse by more than m; perhaps better);
- worse: the interval lies above 1+m (worse than full FT by more than the margin);
- inconclusive: the interval reaches past 1+m from below it: more seeds or test data are needed to tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from studykit.bootstrap_replicates import percentile_interval, seeds_and_trees_replicates

VERDICT_CONFIDENCE = 0.90
ANSWERS = ("equivalent", "non-inferior", "worse", "inconclusive")


@dataclass
class Verdict:
    run: str
    reference: str
    ratio: float
    interval_90: Optional[tuple[float, float]]
    margin: float
    answer: str
    covers: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def answer(interval: Optional[tuple[float, float]], margin: float) -> str:
    """One of ANSWERS for a 90% interval of the ratio to full FT and a margin (0.05 is 5% in perplexity)."""
    if interval is None or any(math.isnan(value) for value in interval):
        return "inconclusive"
    low, high = interval
    upper, lower = 1 + margin, 1 / (1 + margin)
    if low > upper:
        return "worse"
    if high >= upper:
        return "inconclusive"
    return "equivalent" if low > lower else "non-inferior"


def seed_paired_ratio(
    nll_by_seed: np.ndarray,
    reference_nll_by_seed: np.ndarray,
    tokens: np.ndarray,
    tree_ids,
    resamples: int,
    seed: int,
) -> tuple[float, Optional[tuple[float, float]]]:
    """exp(mean over seeds of (sum NLL_s - sum reference_s) / tokens) and its 90% seeds-and-trees interval (the
    report's draws for the same bootstrap seed, so its 95% interval holds this one)."""
    difference = np.atleast_2d(nll_by_seed) - np.atleast_2d(reference_nll_by_seed)
    ratio = math.exp(float(difference.sum(axis=1).mean() / np.sum(tokens)))
    replicates = seeds_and_trees_replicates(difference, tokens, tree_ids, resamples, seed)
    if replicates is None:
        return ratio, None
    low, high = percentile_interval(replicates, VERDICT_CONFIDENCE)
    return ratio, (math.exp(low), math.exp(high))


def sentence(verdict: Verdict) -> str:
    """The verdict of one run in one sentence."""
    margin = f"{verdict.margin:.0%}"
    if verdict.interval_90 is None:
        return (
            f"**{verdict.run}: inconclusive**: ratio to {verdict.reference} {verdict.ratio:.3f}, but too few held-out "
            "conversation trees for an interval."
        )
    low, high = verdict.interval_90
    where = {
        "equivalent": f"equivalent to {verdict.reference} within {margin}",
        "non-inferior": f"no worse than {verdict.reference} by more than {margin} (and possibly better)",
        "worse": f"worse than {verdict.reference} by more than {margin}",
        "inconclusive": f"inconclusive at a {margin} margin: the interval reaches past {1 + verdict.margin:.2f}",
    }[verdict.answer]
    return (
        f"**{verdict.run}: {verdict.answer}**: {where} (perplexity ratio {verdict.ratio:.3f}, "
        f"90% interval [{low:.3f}, {high:.3f}])."
    )
