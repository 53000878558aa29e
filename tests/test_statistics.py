"""The study's intervals, checked on hand-built per-response NLL: the tree bootstrap moves whole conversation trees,
the two-level bootstrap counts seeds as well as trees, paired comparisons cancel what the two runs share, forgetting
is a change from the base model, and the Pareto front keeps exactly the points nothing beats."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studykit import statistics
from studykit.statistics import (
    MIN_TEXTS_FOR_INTERVAL,
    MIN_TREES_FOR_INTERVAL,
    nll_change_per_token,
    nll_change_seeds,
    paired_ratio_by_tree,
    paired_ratio_seeds_and_trees,
    pareto_front,
    perplexity_interval,
    perplexity_interval_by_tree,
    response_resample_counts,
    seeds_and_trees,
    tree_resample_counts,
)


def perplexity(nll, tokens):
    return math.exp(np.sum(nll) / np.sum(tokens))


def conversation_trees(tree_count, seed, responses_per_tree=(1, 6), difficulty_shape=4.0):
    """Responses grouped into trees of varying size and difficulty (3.2 nats per token on average, trees spread more
    for a smaller difficulty_shape), with tree ids that are neither sorted nor contiguous, as OASST's are.
    Returns (nll, tokens, tree_ids)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*responses_per_tree, size=tree_count)
    tree_ids = np.repeat(rng.permutation(10 * tree_count)[:tree_count] * 7 + 3, sizes)
    tokens = rng.integers(5, 80, size=len(tree_ids))
    tree_difficulty = np.repeat(rng.gamma(difficulty_shape, 3.2 / difficulty_shape, size=tree_count), sizes)
    nll = tree_difficulty * rng.uniform(0.8, 1.2, size=len(tree_ids)) * tokens
    order = rng.permutation(len(tree_ids))
    return nll[order], tokens[order], tree_ids[order]


def width(interval):
    low, high = interval
    return high - low


# ---------------------------------------------------------------------------------------------------------------------
# The tree bootstrap
# ---------------------------------------------------------------------------------------------------------------------


def test_tree_resample_counts_draw_as_many_trees_as_there_are_with_replacement():
    counts = tree_resample_counts(12, 3000, np.random.default_rng(0))
    assert counts.shape == (3000, 12) and counts.min() >= 0
    assert (counts.sum(axis=1) == 12).all()
    # Each tree is drawn once per resample on average, and some resamples leave a tree out.
    assert counts.mean(axis=0) == pytest.approx(np.ones(12), abs=0.06)
    assert (counts == 0).any(axis=1).mean() > 0.9


def test_a_drawn_tree_brings_all_its_responses_each_as_often_as_the_tree_was_drawn():
    nll, tokens, tree_ids = conversation_trees(25, seed=1)
    counts = response_resample_counts(tree_ids, resamples=300, seed=4)
    assert counts.shape == (300, len(tree_ids))
    times_drawn = []
    for tree in np.unique(tree_ids):
        of_tree = counts[:, tree_ids == tree]
        assert (of_tree == of_tree[:, :1]).all(), f"tree {tree}'s responses were drawn apart"
        times_drawn.append(of_tree[:, 0])
    assert (np.sum(times_drawn, axis=0) == 25).all(), "each resample draws as many trees as there are"
    assert np.ptp(times_drawn, axis=0).max() > 0, "trees are drawn with replacement, some more often than others"


def test_the_tree_interval_is_the_percentile_interval_of_those_resamples():
    nll, tokens, tree_ids = conversation_trees(30, seed=2)
    counts = response_resample_counts(tree_ids, resamples=400, seed=7)
    resampled = np.exp((counts @ nll) / (counts @ tokens))
    expected = np.percentile(resampled, [2.5, 97.5])
    assert perplexity_interval_by_tree(nll, tokens, tree_ids, resamples=400, seed=7) == pytest.approx(expected)


def test_trees_of_identical_responses_give_a_wider_interval_than_resampling_responses():
    """Eight identical responses per tree are one observation, not eight: resampling responses treats them as
    independent and gives an interval about sqrt(8) too narrow."""
    rng = np.random.default_rng(3)
    tree_difficulty = rng.gamma(4.0, 0.8, size=30)
    tree_ids = np.repeat(np.arange(30), 8)
    tokens = np.full(len(tree_ids), 40)
    nll = np.repeat(tree_difficulty, 8) * tokens
    by_tree = perplexity_interval_by_tree(nll, tokens, tree_ids, resamples=2000, seed=0)
    by_response = perplexity_interval(nll, tokens, resamples=2000, seed=0)
    assert by_tree[0] < perplexity(nll, tokens) < by_tree[1]
    assert width(by_tree) > 2 * width(by_response)


def test_one_response_per_tree_is_the_response_bootstrap_in_distribution():
    nll, tokens, _ = conversation_trees(400, seed=5, responses_per_tree=(1, 2))
    by_tree = perplexity_interval_by_tree(nll, tokens, np.arange(len(nll)), resamples=2000, seed=0)
    by_response = perplexity_interval(nll, tokens, resamples=2000, seed=0)
    assert width(by_tree) == pytest.approx(width(by_response), rel=0.15)


def test_too_few_trees_get_no_interval_however_many_responses_they_hold():
    rng = np.random.default_rng(6)
    tree_ids = np.repeat(np.arange(MIN_TREES_FOR_INTERVAL - 1), 50)
    tokens = rng.integers(5, 60, size=len(tree_ids))
    nll = rng.gamma(4.0, 0.8, size=len(tree_ids)) * tokens
    assert perplexity_interval_by_tree(nll, tokens, tree_ids, resamples=200, seed=0) is None
    assert paired_ratio_by_tree(nll, nll * 1.1, tokens, tree_ids, resamples=200, seed=0)["ci_low"] is None
    summary = seeds_and_trees(nll[None], tokens, tree_ids, resamples=200, seed=0)
    assert summary["ci_low"] is None and summary["covers"] == statistics.TOO_FEW_TREES_COVER
    enough = np.repeat(np.arange(MIN_TREES_FOR_INTERVAL), 2)
    assert perplexity_interval_by_tree(np.full(len(enough), 90.0), np.full(len(enough), 20), enough, 200, 0)


def test_the_paired_tree_ratio_cancels_what_both_models_share():
    nll, tokens, tree_ids = conversation_trees(60, seed=8)
    paired = paired_ratio_by_tree(nll * 0.9, nll, tokens, tree_ids, resamples=1000, seed=0)
    assert paired["ratio"] == pytest.approx(perplexity(nll * 0.9, tokens) / perplexity(nll, tokens))
    assert paired["ci_low"] <= paired["ratio"] <= paired["ci_high"] < 1
    same = paired_ratio_by_tree(nll, nll, tokens, tree_ids, resamples=200, seed=0)
    assert same == {"ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_mismatched_inputs_are_refused_in_one_sentence():
    nll, tokens, tree_ids = conversation_trees(25, seed=9)
    with pytest.raises(ValueError, match="one tree id per response"):
        perplexity_interval_by_tree(nll, tokens, tree_ids[:-1], resamples=10, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        seeds_and_trees(np.stack([nll, nll])[:, :-1], tokens, tree_ids, resamples=10, seed=0)
    with pytest.raises(ValueError, match="use seeds_and_trees"):
        perplexity_interval_by_tree(np.stack([nll, nll]), tokens, tree_ids, resamples=10, seed=0)
    with pytest.raises(ValueError, match="same seeds"):
        paired_ratio_seeds_and_trees(np.stack([nll, nll]), nll[None], tokens, tree_ids, resamples=10, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and trees
# ---------------------------------------------------------------------------------------------------------------------


def shifted_seeds(nll, tokens, shifts):
    """The same responses scored by runs whose seeds differ by `shifts` nats per token."""
    return np.stack([nll + shift * tokens for shift in shifts])


def test_the_seed_summary_is_the_mean_of_each_seeds_perplexity():
    nll, tokens, tree_ids = conversation_trees(40, seed=10)
    by_seed = shifted_seeds(nll, tokens, [-0.05, 0.0, 0.08])
    summary = seeds_and_trees(by_seed, tokens, tree_ids, resamples=500, seed=0)
    each = [perplexity(row, tokens) for row in by_seed]
    assert summary["seed_perplexities"] == pytest.approx(each)
    assert summary["mean_perplexity"] == pytest.approx(np.mean(each))
    assert summary["seed_std"] == pytest.approx(np.std(each, ddof=1))
    assert summary["seed_range"] == pytest.approx((min(each), max(each)))
    assert summary["seed_count"] == 3 and summary["tree_count"] == 40
    assert summary["covers"] == statistics.SEEDS_AND_TREES_COVER


def test_the_two_level_interval_holds_the_mean_and_widens_when_seeds_disagree():
    # Trees of similar difficulty, so that seeds 0.15 nats per token apart are a visible part of the interval.
    nll, tokens, tree_ids = conversation_trees(50, seed=11, difficulty_shape=400.0)
    agreeing = seeds_and_trees(shifted_seeds(nll, tokens, [0.0, 0.0, 0.0]), tokens, tree_ids, 2000, seed=0)
    disagreeing = seeds_and_trees(shifted_seeds(nll, tokens, [-0.15, 0.0, 0.15]), tokens, tree_ids, 2000, seed=0)
    for summary in (agreeing, disagreeing):
        assert summary["ci_low"] < summary["mean_perplexity"] < summary["ci_high"]
    agreeing_width = agreeing["ci_high"] - agreeing["ci_low"]
    assert disagreeing["ci_high"] - disagreeing["ci_low"] > 1.5 * agreeing_width
    # Seeds that agree add nothing: the interval is the one seed's tree interval.
    tree_interval = perplexity_interval_by_tree(nll, tokens, tree_ids, 2000, seed=0)
    assert (agreeing["ci_low"], agreeing["ci_high"]) == pytest.approx(tree_interval)


def test_one_seed_gives_the_tree_interval_and_says_training_noise_is_left_out():
    nll, tokens, tree_ids = conversation_trees(45, seed=12)
    summary = seeds_and_trees(nll[None], tokens, tree_ids, resamples=1000, seed=3)
    assert (summary["ci_low"], summary["ci_high"]) == perplexity_interval_by_tree(nll, tokens, tree_ids, 1000, seed=3)
    assert summary["seed_std"] is None and summary["seed_count"] == 1
    assert summary["covers"] == statistics.TREES_ONLY_COVER
    assert "training noise is not in the interval" in summary["covers"]
    assert seeds_and_trees(nll, tokens, tree_ids, resamples=1000, seed=3) == summary, "a 1-D array is one seed"


def test_the_paired_ratio_across_seeds_is_the_geometric_mean_of_the_seeds_ratios():
    nll, tokens, tree_ids = conversation_trees(40, seed=13)
    reference = shifted_seeds(nll, tokens, [0.0, 0.1, -0.05])
    run = shifted_seeds(nll, tokens, [-0.08, 0.05, -0.1])
    paired = paired_ratio_seeds_and_trees(run, reference, tokens, tree_ids, resamples=1000, seed=0)
    by_hand = [
        perplexity(run_seed, tokens) / perplexity(reference_seed, tokens)
        for run_seed, reference_seed in zip(run, reference)
    ]
    assert paired["seed_ratios"] == pytest.approx(by_hand)
    assert paired["ratio"] == pytest.approx(math.prod(by_hand) ** (1 / 3))
    assert paired["ci_low"] <= paired["ratio"] <= paired["ci_high"]
    assert paired["covers"] == statistics.PAIRED_SEEDS_AND_TREES_COVER


def test_the_paired_seeds_bootstrap_draws_one_seed_index_for_run_and_reference():
    """Seeds that move run and reference together (the data order they share) cancel in the ratio: drawn as a pair,
    every resample gives the same ratio; drawn apart, they would spread it by the seeds' disagreement."""
    nll, tokens, tree_ids = conversation_trees(40, seed=14)
    reference = shifted_seeds(nll, tokens, [-0.2, 0.0, 0.2])
    run = reference - 0.1 * tokens
    paired = paired_ratio_seeds_and_trees(run, reference, tokens, tree_ids, resamples=1000, seed=0)
    assert paired["ci_low"] == pytest.approx(math.exp(-0.1)) and paired["ci_high"] == pytest.approx(math.exp(-0.1))


def test_the_paired_ratio_with_one_seed_is_the_paired_tree_ratio():
    nll, tokens, tree_ids = conversation_trees(40, seed=15)
    across_seeds = paired_ratio_seeds_and_trees(nll[None] * 0.95, nll[None], tokens, tree_ids, 800, seed=2)
    by_tree = paired_ratio_by_tree(nll * 0.95, nll, tokens, tree_ids, 800, seed=2)
    assert {key: across_seeds[key] for key in by_tree} == by_tree
    assert across_seeds["covers"] == statistics.TREES_ONLY_COVER


# ---------------------------------------------------------------------------------------------------------------------
# Forgetting
# ---------------------------------------------------------------------------------------------------------------------


def general_texts(count, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 400, size=count)
    base_nll = rng.gamma(6.0, 0.5, size=count) * tokens
    return base_nll, tokens


def test_forgetting_is_the_change_in_nll_per_token_and_its_exp_is_the_perplexity_ratio():
    base_nll, tokens = general_texts(200, seed=16)
    rng = np.random.default_rng(17)
    tuned_nll = base_nll + rng.normal(0.04, 0.05, size=len(tokens)) * tokens
    forgetting = nll_change_per_token(tuned_nll, base_nll, tokens, resamples=1000, seed=0)
    assert forgetting["change"] == pytest.approx((tuned_nll.sum() - base_nll.sum()) / tokens.sum())
    assert math.exp(forgetting["change"]) == pytest.approx(perplexity(tuned_nll, tokens) / perplexity(base_nll, tokens))
    assert 0 < forgetting["ci_low"] < forgetting["change"] < forgetting["ci_high"], "worse on general text: forgot"
    assert nll_change_per_token(base_nll, base_nll, tokens, 200, seed=0) == {
        "change": 0.0,
        "ci_low": 0.0,
        "ci_high": 0.0,
    }


def test_forgetting_over_too_few_texts_gets_no_interval():
    base_nll, tokens = general_texts(MIN_TEXTS_FOR_INTERVAL - 1, seed=18)
    forgetting = nll_change_per_token(base_nll * 1.02, base_nll, tokens, resamples=200, seed=0)
    assert forgetting["change"] > 0 and forgetting["ci_low"] is None and forgetting["ci_high"] is None
    assert nll_change_seeds(base_nll * 1.02, base_nll, tokens, 200, seed=0)["covers"] == statistics.TOO_FEW_TEXTS_COVER


def test_forgetting_across_seeds_is_the_mean_change_with_its_spread():
    base_nll, tokens = general_texts(150, seed=19)
    by_seed = shifted_seeds(base_nll, tokens, [0.02, 0.05, 0.03])
    forgetting = nll_change_seeds(by_seed, base_nll, tokens, resamples=1000, seed=0)
    assert forgetting["seed_changes"] == pytest.approx([0.02, 0.05, 0.03])
    assert forgetting["change"] == pytest.approx(np.mean([0.02, 0.05, 0.03]))
    assert forgetting["seed_std"] == pytest.approx(np.std([0.02, 0.05, 0.03], ddof=1))
    assert forgetting["seed_range"] == pytest.approx((0.02, 0.05))
    # The texts cancel exactly (each seed is the base plus a constant per token), so only seeds spread the interval.
    assert 0.02 <= forgetting["ci_low"] < forgetting["change"] < forgetting["ci_high"] <= 0.05
    assert forgetting["covers"] == statistics.SEEDS_AND_TEXTS_COVER


def test_forgetting_with_one_seed_is_the_single_models_change():
    base_nll, tokens = general_texts(120, seed=20)
    tuned_nll = base_nll * np.random.default_rng(21).uniform(0.98, 1.06, size=len(tokens))
    one_seed = nll_change_seeds(tuned_nll[None], base_nll, tokens, resamples=700, seed=5)
    single = nll_change_per_token(tuned_nll, base_nll, tokens, resamples=700, seed=5)
    assert {key: one_seed[key] for key in single} == single
    assert one_seed["seed_std"] is None and one_seed["covers"] == statistics.TEXTS_ONLY_COVER


# ---------------------------------------------------------------------------------------------------------------------
# The Pareto front
# ---------------------------------------------------------------------------------------------------------------------


def test_the_pareto_front_keeps_what_nothing_beats_ordered_by_cost():
    #        0     1    2    3    4    5    6
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0]
    perplexities = [10.0, 8.0, 9.0, 8.0, 5.0, 5.0, 7.0]
    # 2 loses to 1 at the same cost; 3 ties 1's perplexity at a higher cost; 4 and 5 are the same point (neither
    # beats the other); 6 costs more than 4 and is worse.
    assert pareto_front(costs, perplexities) == [0, 1, 4, 5]
    assert pareto_front([3.0, 1.0, 2.0], [1.0, 3.0, 2.0]) == [1, 2, 0], "ordered by cost, not by input order"
    assert pareto_front([5.0], [20.0]) == [0]
    assert pareto_front([], []) == []


def test_points_with_missing_values_are_never_on_the_front():
    assert pareto_front([1.0, None, 3.0, float("nan")], [9.0, 1.0, 2.0, 0.5]) == [0, 2]
    assert pareto_front([1.0, 2.0], [float("inf"), 4.0]) == [1]


finite = st.floats(min_value=0, max_value=10, allow_nan=False).map(lambda value: round(value, 1))


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(finite, finite), max_size=12))
def test_the_pareto_front_is_every_point_no_other_point_dominates(points):
    costs, perplexities = [cost for cost, _ in points], [perplexity for _, perplexity in points]

    def beaten(index):
        cost, value = points[index]
        return any(
            other_cost <= cost and other_value <= value and (other_cost, other_value) != (cost, value)
            for other_cost, other_value in points
        )

    expected = sorted((index for index in range(len(points)) if not beaten(index)), key=lambda i: (costs[i], i))
    assert pareto_front(costs, perplexities) == expected
