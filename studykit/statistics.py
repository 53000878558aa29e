"""Bootstrap intervals for the study's comparisons, as pure functions of per-response NLL sums and token counts.

The unit a bootstrap resamples is the unit that is independent. Held-out OASST responses are not: the responses of one
conversation tree share a prompt and its context, so the tree bootstraps here draw whole trees. Texts of a general-text
set (forgetting) are independent, so those draw texts. A run trained with several seeds adds training noise (data
order, LoRA init, dropout); the two-level bootstraps draw seeds and then trees, so their intervals hold both.

The response-level `perplexity_interval` and `paired_ratio` stay for callers that score independent texts."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95

# Below this many texts a bootstrap "interval" only lists the few texts' own perplexities; none is given.
MIN_TEXTS_FOR_INTERVAL = 20

# Bootstrap resamples are drawn this many at a time, so memory stays at CHUNK x responses indices.
BOOTSTRAP_CHUNK = 200

# The tree is the independent unit, so the reasoning behind MIN_TEXTS_FOR_INTERVAL applies to trees: with fewer, a
# percentile bootstrap mostly lists the few trees' own perplexities and covers well under 95% (its spread is short by
# about sqrt((n - 1) / n) and its tails are lumpy).
MIN_TREES_FOR_INTERVAL = MIN_TEXTS_FOR_INTERVAL

# The tree bootstraps hold at most this many resample-by-tree counts at once (16 MB as float64). Measured peak
# (tracemalloc, 2,000 resamples): 62 MB for 3 seeds x 40,000 responses in 8,000 trees, 79 MB for 40,000 texts.
TREE_CHUNK_ELEMENTS = 2_000_000

# Seeds are drawn from their own random stream, so the trees drawn for a seed argument are the same whatever the number
# of seeds: one seed's two-level interval is then exactly its tree interval, and runs with different seed counts are
# resampled on the same trees.
SEED_DRAW_STREAM = 1

# What each interval covers and leaves out, in the words the report prints beside it.
SEEDS_AND_TREES_COVER = (
    "seeds (training noise: data order, LoRA init, dropout) and held-out conversation trees; "
    "not the choice of learning-rate grid or of the base model"
)
PAIRED_SEEDS_AND_TREES_COVER = (
    "seeds (training noise: data order, LoRA init, dropout; each run paired with the "
    "reference trained on the same seed) and held-out conversation trees; "
    "not the choice of learning-rate grid or of the base model"
)
TREES_ONLY_COVER = "held-out conversation trees only; one seed, so training noise is not in the interval"
SEEDS_AND_TEXTS_COVER = (
    "seeds (training noise: data order, LoRA init, dropout) and general texts; "
    "not the choice of learning-rate grid, of the base model or of the general-text set"
)
TEXTS_ONLY_COVER = "general texts only; one seed, so training noise is not in the interval"
TOO_FEW_TREES_COVER = f"no interval: under {MIN_TREES_FOR_INTERVAL} held-out conversation trees"
TOO_FEW_TEXTS_COVER = f"no interval: under {MIN_TEXTS_FOR_INTERVAL} general texts"


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


def perplexity_interval(
    nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> Optional[tuple[float, float]]:
    """95% interval of the token-weighted perplexity exp(sum NLL / sum tokens), resampling whole responses
    (None for fewer than MIN_TEXTS_FOR_INTERVAL)."""
    if len(nll) < MIN_TEXTS_FOR_INTERVAL:
        return None
    nll_sums, token_sums = _resampled_sums([nll, tokens], resamples, seed)
    return _percentile_interval(np.exp(nll_sums / token_sums))


def paired_ratio(
    nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> dict[str, Optional[float]]:
    """Perplexity ratio of a model to a reference scored on the same responses, with a paired bootstrap interval:
    each resample takes the same responses for both, so what the two share (hard responses) cancels."""
    difference = np.asarray(nll, dtype=np.float64) - np.asarray(reference_nll, dtype=np.float64)
    ratio = math.exp(difference.sum() / np.sum(tokens))
    if len(difference) < MIN_TEXTS_FOR_INTERVAL:
        return {"ratio": ratio, "ci_low": None, "ci_high": None}
    difference_sums, token_sums = _resampled_sums([difference, tokens], resamples, seed)
    low, high = _percentile_interval(np.exp(difference_sums / token_sums))
    return {"ratio": ratio, "ci_low": low, "ci_high": high}


# ---------------------------------------------------------------------------------------------------------------------
# Tree bootstrap: resample whole conversation trees
# ---------------------------------------------------------------------------------------------------------------------


def tree_resample_counts(tree_count: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of `tree_count` trees is drawn in each of `resamples` bootstrap resamples, shape
    (resamples, tree_count), int64: each resample draws tree_count trees with replacement, so every row sums to
    tree_count. Also draws seeds (a seed is drawn like a tree)."""
    drawn = rng.integers(0, tree_count, size=(resamples, tree_count))
    # One bincount over all rows: offset each row's draws into its own block of tree_count bins.
    offsets = np.arange(resamples)[:, None] * tree_count
    return np.bincount((drawn + offsets).ravel(), minlength=resamples * tree_count).reshape(resamples, tree_count)


def _tree_chunks(tree_count: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """`tree_resample_counts` for `resamples` resamples, a chunk of rows at a time so memory stays bounded; the same
    seed and tree count always give the same resamples."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(BOOTSTRAP_CHUNK, TREE_CHUNK_ELEMENTS // max(tree_count, 1)))
    for start in range(0, resamples, rows):
        yield tree_resample_counts(tree_count, min(rows, resamples - start), rng)


def _tree_index(tree_ids: Sequence) -> tuple[np.ndarray, int]:
    """Each response's tree as a number in 0..trees-1, and the number of trees."""
    trees, tree_of_response = np.unique(np.asarray(tree_ids), return_inverse=True)
    return tree_of_response.ravel(), len(trees)


def response_resample_counts(tree_ids: Sequence, resamples: int, seed: int) -> np.ndarray:
    """How often each response is in each resample of the tree bootstrap, shape (resamples, responses): the count of
    its tree, so a drawn tree brings all its responses, each as often as the tree was drawn. The same draws the tree
    intervals use for this seed; for checking them, since it holds resamples x responses numbers."""
    tree_of_response, tree_count = _tree_index(tree_ids)
    return np.concatenate([counts[:, tree_of_response] for counts in _tree_chunks(tree_count, resamples, seed)])


def _sums_by_tree(values_by_seed: np.ndarray, tree_of_response: np.ndarray, tree_count: int) -> np.ndarray:
    """Per-tree sums of each row of `values_by_seed` (seeds, responses), shape (seeds, trees)."""
    return np.stack([np.bincount(tree_of_response, weights=row, minlength=tree_count) for row in values_by_seed])


def _two_level_resamples(
    numerators_by_tree: np.ndarray,
    tokens_by_tree: np.ndarray,
    per_seed: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """Bootstrap replicates of the mean over drawn seeds of per_seed(sum numerator / sum tokens over drawn trees).

    numerators_by_tree is (seeds, trees), tokens_by_tree (trees,). Each replicate draws seeds with replacement and
    trees with replacement; the drawn trees are the same for every drawn seed, because every seed scored the same
    texts. With one seed every replicate takes that seed, so this is the plain tree bootstrap."""
    seed_count, tree_count = numerators_by_tree.shape
    seed_rng = np.random.default_rng([seed, SEED_DRAW_STREAM])
    replicates = np.empty(resamples)
    start = 0
    for tree_counts in _tree_chunks(tree_count, resamples, seed):
        # float64 so the products go through BLAS; integer matmul in numpy does not.
        weights = tree_counts.astype(np.float64)
        per_seed_values = per_seed((weights @ numerators_by_tree.T) / (weights @ tokens_by_tree)[:, None])
        seed_counts = tree_resample_counts(seed_count, len(weights), seed_rng)
        replicates[start : start + len(weights)] = (seed_counts * per_seed_values).sum(axis=1) / seed_count
        start += len(weights)
    return replicates


def _per_response_arrays(
    values_by_seed: np.ndarray, tokens: np.ndarray, tree_ids: Optional[Sequence]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """values_by_seed as (seeds, responses) float64 and tokens as float64, with each response's tree and the tree
    count; without tree_ids every response is its own tree (independent texts)."""
    values_by_seed = np.atleast_2d(np.asarray(values_by_seed, dtype=np.float64))
    tokens = np.asarray(tokens, dtype=np.float64)
    if values_by_seed.ndim != 2 or values_by_seed.shape[1] != len(tokens):
        raise ValueError(
            f"NLL of shape {values_by_seed.shape} does not match {len(tokens)} token counts; "
            "pass (seeds, responses) scored on the same responses."
        )
    if tree_ids is None:
        return values_by_seed, tokens, np.arange(len(tokens)), len(tokens)
    if len(tree_ids) != len(tokens):
        raise ValueError(f"{len(tree_ids)} tree ids for {len(tokens)} responses; pass one tree id per response.")
    tree_of_response, tree_count = _tree_index(tree_ids)
    return values_by_seed, tokens, tree_of_response, tree_count


def _one_model(nll: np.ndarray, several_seeds: str) -> np.ndarray:
    """nll as one model's values per response; several seeds' belong to the seeds function named."""
    if np.ndim(nll) != 1:
        raise ValueError(
            f"expected one model's NLL per response, got shape {np.shape(nll)}; for several seeds use {several_seeds}."
        )
    return nll


def _replicates(
    values_by_seed: np.ndarray,
    tokens: np.ndarray,
    tree_of_response: np.ndarray,
    tree_count: int,
    per_seed: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    seed: int,
) -> np.ndarray:
    """`_two_level_resamples` from per-response values (seeds, responses) and token counts, summed per tree first."""
    return _two_level_resamples(
        _sums_by_tree(values_by_seed, tree_of_response, tree_count),
        _sums_by_tree(tokens[None], tree_of_response, tree_count)[0],
        per_seed,
        resamples,
        seed,
    )


def _unchanged(values: np.ndarray) -> np.ndarray:
    return values


def _seed_spread(per_seed_values: np.ndarray) -> dict:
    """The seeds' sample standard deviation (None for one seed: there is no spread to see) and their range."""
    values = [float(value) for value in per_seed_values]
    return {
        "seed_std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "seed_range": (min(values), max(values)),
    }


def _cover(
    seed_count: int, unit_count: int, minimum: int, seeds_cover: str, one_seed_cover: str, too_few_cover: str
) -> str:
    if unit_count < minimum:
        return too_few_cover
    return seeds_cover if seed_count > 1 else one_seed_cover


def perplexity_interval_by_tree(
    nll: np.ndarray, tokens: np.ndarray, tree_ids: Sequence, resamples: int, seed: int
) -> Optional[tuple[float, float]]:
    """95% interval of the token-weighted perplexity exp(sum NLL / sum tokens), resampling whole conversation trees.

    Covers which held-out conversations were drawn, counting a tree's responses as one unit (they share a prompt and
    context, so treating them as independent makes the interval too narrow). Leaves out training noise (one model)
    and anything every tree shares (the split's source, the tokenizer, the base model). None for fewer than
    MIN_TREES_FOR_INTERVAL trees."""
    nll_by_seed, tokens, tree_of_response, tree_count = _per_response_arrays(
        _one_model(nll, "seeds_and_trees"), tokens, tree_ids
    )
    if tree_count < MIN_TREES_FOR_INTERVAL:
        return None
    return _percentile_interval(_replicates(nll_by_seed, tokens, tree_of_response, tree_count, np.exp, resamples, seed))


def _paired_log_ratios(
    nll_by_seed: np.ndarray,
    reference_nll_by_seed: np.ndarray,
    tokens: np.ndarray,
    tree_ids: Sequence,
    resamples: int,
    seed: int,
) -> tuple[np.ndarray, Optional[np.ndarray], int]:
    """Per-seed log perplexity ratios (sum nll - sum reference) / sum tokens, the bootstrap replicates of their mean
    over drawn seed indices and trees (None under MIN_TREES_FOR_INTERVAL trees), and the tree count."""
    nll_by_seed, tokens, tree_of_response, tree_count = _per_response_arrays(nll_by_seed, tokens, tree_ids)
    reference_nll_by_seed = np.atleast_2d(np.asarray(reference_nll_by_seed, dtype=np.float64))
    if reference_nll_by_seed.shape != nll_by_seed.shape:
        raise ValueError(
            f"the reference's NLL has shape {reference_nll_by_seed.shape}, the run's {nll_by_seed.shape}; "
            "score both on the same responses with the same seeds."
        )
    # Seed by seed, and the seed index is drawn once for both: the same seed is the same data order for both runs.
    difference_by_seed = nll_by_seed - reference_nll_by_seed
    log_ratios = difference_by_seed.sum(axis=1) / tokens.sum()
    if tree_count < MIN_TREES_FOR_INTERVAL:
        return log_ratios, None, tree_count
    replicates = _replicates(difference_by_seed, tokens, tree_of_response, tree_count, _unchanged, resamples, seed)
    return log_ratios, replicates, tree_count


def paired_ratio_by_tree(
    nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray, tree_ids: Sequence, resamples: int, seed: int
) -> dict[str, Optional[float]]:
    """Perplexity ratio of a model to a reference scored on the same responses, exp((sum nll - sum reference) / sum
    tokens), with a paired tree-bootstrap interval.

    Each resample draws the same trees for both models, so what they share (hard conversations) cancels and the
    interval covers how the difference between them varies across held-out trees. Leaves out training noise (one
    model each). ci_low and ci_high are None for fewer than MIN_TREES_FOR_INTERVAL trees."""
    log_ratios, replicates, _ = _paired_log_ratios(
        _one_model(nll, "paired_ratio_seeds_and_trees"), reference_nll, tokens, tree_ids, resamples, seed
    )
    low, high = _percentile_interval(np.exp(replicates)) if replicates is not None else (None, None)
    return {"ratio": math.exp(log_ratios[0]), "ci_low": low, "ci_high": high}


# ---------------------------------------------------------------------------------------------------------------------
# Two levels: training seeds, then held-out trees (or texts)
# ---------------------------------------------------------------------------------------------------------------------


def seeds_and_trees(nll_by_seed: np.ndarray, tokens: np.ndarray, tree_ids: Sequence, resamples: int, seed: int) -> dict:
    """A run's test perplexity over its training seeds, with an interval that counts seeds and held-out trees.

    nll_by_seed is (seeds, responses), every seed scored on the same responses (a 1-D array is one seed).
    mean_perplexity is the mean over seeds of each seed's token-weighted perplexity exp(sum NLL / sum tokens);
    seed_perplexities lists them, seed_std is their sample standard deviation (None for one seed) and seed_range
    their (min, max).

    ci_low/ci_high: a 95% percentile interval from a two-level bootstrap. Each resample draws seeds with replacement,
    then trees with replacement (the same trees for every drawn seed: the trees are the same texts), and takes the
    mean over drawn seeds of the perplexity over drawn trees. It covers training noise (data order, LoRA init,
    dropout) and which conversations were held out; it leaves out the learning-rate grid, the base model and
    anything every tree shares. With few seeds the seed part is rough: three seeds give ten distinct draws and a
    bootstrap understates their variance by (seeds - 1) / seeds. With one seed the interval is exactly
    perplexity_interval_by_tree of that seed (same seed argument) and `covers` says training noise is not in it.
    None for fewer than MIN_TREES_FOR_INTERVAL trees; `covers` says which of these holds."""
    nll_by_seed, tokens, tree_of_response, tree_count = _per_response_arrays(nll_by_seed, tokens, tree_ids)
    seed_perplexities = np.exp(nll_by_seed.sum(axis=1) / tokens.sum())
    seed_count = len(seed_perplexities)
    result = {
        "mean_perplexity": float(seed_perplexities.mean()),
        "seed_perplexities": [float(value) for value in seed_perplexities],
        **_seed_spread(seed_perplexities),
        "ci_low": None,
        "ci_high": None,
        "seed_count": seed_count,
        "tree_count": tree_count,
        "covers": _cover(
            seed_count, tree_count, MIN_TREES_FOR_INTERVAL, SEEDS_AND_TREES_COVER, TREES_ONLY_COVER, TOO_FEW_TREES_COVER
        ),
    }
    if tree_count >= MIN_TREES_FOR_INTERVAL:
        replicates = _replicates(nll_by_seed, tokens, tree_of_response, tree_count, np.exp, resamples, seed)
        result["ci_low"], result["ci_high"] = _percentile_interval(replicates)
    return result


def paired_ratio_seeds_and_trees(
    nll_by_seed: np.ndarray,
    reference_nll_by_seed: np.ndarray,
    tokens: np.ndarray,
    tree_ids: Sequence,
    resamples: int,
    seed: int,
) -> dict:
    """Perplexity ratio of a run to the reference across seeds, with an interval over seeds and held-out trees.

    Both arrays are (seeds, responses) and row s of each was trained with seed s (the same data order). seed_ratios
    are exp((sum nll_s - sum reference_s) / sum tokens); ratio is their geometric mean, the mean of log ratios, so a
    ratio and its inverse combine symmetrically. ci_low/ci_high: a 95% percentile interval from a two-level paired
    bootstrap: each resample draws seed indices with replacement (run and reference share each drawn seed, so the
    data order they share cancels) and then trees (the same for both), and takes the geometric mean of the drawn
    seeds' ratios over the drawn trees. It covers training noise and which conversations were held out; it leaves out
    the learning-rate grid and the base model. With one seed it is paired_ratio_by_tree's interval and `covers` says
    training noise is not in it; None for fewer than MIN_TREES_FOR_INTERVAL trees."""
    log_ratios, replicates, tree_count = _paired_log_ratios(
        nll_by_seed, reference_nll_by_seed, tokens, tree_ids, resamples, seed
    )
    low, high = _percentile_interval(np.exp(replicates)) if replicates is not None else (None, None)
    return {
        "ratio": math.exp(log_ratios.mean()),
        "seed_ratios": [math.exp(value) for value in log_ratios],
        "ci_low": low,
        "ci_high": high,
        "seed_count": len(log_ratios),
        "tree_count": tree_count,
        "covers": _cover(
            len(log_ratios),
            tree_count,
            MIN_TREES_FOR_INTERVAL,
            PAIRED_SEEDS_AND_TREES_COVER,
            TREES_ONLY_COVER,
            TOO_FEW_TREES_COVER,
        ),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Forgetting: the change in NLL per token on general text, from the base model
# ---------------------------------------------------------------------------------------------------------------------


def _nll_changes(
    nll_by_seed: np.ndarray, base_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-seed changes (sum nll_s - sum base) / sum tokens and the bootstrap replicates of their mean over drawn
    seeds and texts (None under MIN_TEXTS_FOR_INTERVAL texts)."""
    nll_by_seed, tokens, text_index, text_count = _per_response_arrays(nll_by_seed, tokens, None)
    base_nll = np.asarray(base_nll, dtype=np.float64)
    if base_nll.shape != tokens.shape:
        raise ValueError(
            f"the base model's NLL has {base_nll.size} values for {len(tokens)} texts; "
            "score the base on the same general texts."
        )
    difference_by_seed = nll_by_seed - base_nll[None]
    changes = difference_by_seed.sum(axis=1) / tokens.sum()
    if text_count < MIN_TEXTS_FOR_INTERVAL:
        return changes, None
    return changes, _replicates(difference_by_seed, tokens, text_index, text_count, _unchanged, resamples, seed)


def nll_change_per_token(
    nll: np.ndarray, base_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> dict[str, Optional[float]]:
    """Forgetting as a change: (sum nll - sum base_nll) / sum tokens on the same general texts, in nats per token.

    Positive means the fine-tuned model is worse than the base on general text (it forgot); exp(change) is its
    perplexity there divided by the base's (0.01 nats per token is a 1% higher perplexity). ci_low/ci_high: a paired
    95% bootstrap over texts (each resample draws the same texts for both models, and texts are independent, so
    they are drawn one by one); it covers which general texts were scored, not training noise (one model) nor the
    choice of general-text set. None for fewer than MIN_TEXTS_FOR_INTERVAL texts."""
    changes, replicates = _nll_changes(_one_model(nll, "nll_change_seeds"), base_nll, tokens, resamples, seed)
    low, high = _percentile_interval(replicates) if replicates is not None else (None, None)
    return {"change": float(changes[0]), "ci_low": low, "ci_high": high}


def nll_change_seeds(
    nll_by_seed: np.ndarray, base_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> dict:
    """Forgetting across seeds: the mean over seeds of each seed's nll_change_per_token, with its spread and an
    interval over seeds and texts.

    nll_by_seed is (seeds, texts); the base model has no seeds, so base_nll is (texts,). seed_changes lists the
    per-seed changes, seed_std their sample standard deviation (None for one seed), seed_range (min, max). exp(change)
    is the perplexity ratio to the base. ci_low/ci_high: a 95% two-level percentile bootstrap, drawing seeds and then
    texts (the same texts for every drawn seed); it covers training noise and which general texts were scored, and
    leaves out the learning-rate grid, the base model and the choice of general-text set. With one seed it is
    nll_change_per_token's interval and `covers` says training noise is not in it."""
    changes, replicates = _nll_changes(nll_by_seed, base_nll, tokens, resamples, seed)
    low, high = _percentile_interval(replicates) if replicates is not None else (None, None)
    text_count = np.shape(tokens)[0]
    return {
        "change": float(changes.mean()),
        "seed_changes": [float(value) for value in changes],
        **_seed_spread(changes),
        "ci_low": low,
        "ci_high": high,
        "seed_count": len(changes),
        "text_count": text_count,
        "covers": _cover(
            len(changes),
            text_count,
            MIN_TEXTS_FOR_INTERVAL,
            SEEDS_AND_TEXTS_COVER,
            TEXTS_ONLY_COVER,
            TOO_FEW_TEXTS_COVER,
        ),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Cost against quality
# ---------------------------------------------------------------------------------------------------------------------


def pareto_front(costs: Sequence[float], perplexities: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none has a cost and a perplexity both at most this point's with
    one of them lower. Ordered by cost (then index).

    Ties: of points at the same cost only the lowest perplexity can be on the front; exact duplicates (same cost,
    same perplexity) beat neither, so all of them are on it. A point with a missing or non-finite value (None, NaN,
    inf) cannot be compared and is never on the front."""
    if len(costs) != len(perplexities):
        raise ValueError(f"{len(costs)} costs for {len(perplexities)} perplexities; pass one of each per point.")
    comparable = [
        index
        for index, (cost, perplexity) in enumerate(zip(costs, perplexities))
        if cost is not None and perplexity is not None and math.isfinite(cost) and math.isfinite(perplexity)
    ]
    front: list[int] = []
    best_cheaper = math.inf
    # Cheapest first: a point is on the front when it beats every cheaper point's perplexity; points of equal cost
    # are weighed against the cheaper ones only, then among themselves.
    ordered = sorted(comparable, key=lambda index: (costs[index], perplexities[index], index))
    for _, same_cost in itertools.groupby(ordered, key=lambda index: costs[index]):
        same_cost = list(same_cost)
        lowest = perplexities[same_cost[0]]
        if lowest < best_cheaper:
            front += [index for index in same_cost if perplexities[index] == lowest]
            best_cheaper = lowest
    return front
