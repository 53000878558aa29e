"""When LoRA falls behind: the log-spaced dev-loss schedule, the departure point on constructed curves, and the nested
training fractions of the data-size axis (dev and test never cut)."""

import json

import datasets
from conftest import train_in_process

from studykit.learning_curves import SeedCurves, departure, dev_loss_steps, seed_curves
from studykit.run_dir import RUN_LOG
from studykit.subsets import in_fraction, subset_indices
from studykit.trainer import training_subset


def test_the_log_schedule_scores_at_powers_of_two_and_the_last_step_beside_every_eval_every():
    assert dev_loss_steps(20, 0, "log") == [1, 2, 4, 8, 16, 20]
    assert dev_loss_steps(20, 5, "log") == [1, 2, 4, 5, 8, 10, 15, 16, 20]
    assert dev_loss_steps(20, 5, "interval") == [5, 10, 15, 20]
    assert dev_loss_steps(16, 0, "log") == [1, 2, 4, 8, 16]


def test_a_training_on_the_log_schedule_logs_dev_loss_at_those_steps(tmp_path, small_vocab_inputs):
    train_in_process("full", small_vocab_inputs, tmp_path / "run", max_steps=6, eval_every=0, eval_schedule="log")
    entries = [json.loads(line) for line in (tmp_path / "run" / RUN_LOG).read_text().splitlines()]
    assert [e["step"] for e in entries if "dev_loss" in e] == [1, 2, 4, 6]


def curves(*seeds):
    return SeedCurves(list(range(1, len(seeds[0]) + 1)), [100.0 * (i + 1) for i in range(len(seeds[0]))], list(seeds))


FULL = curves([3.0, 2.5, 2.0, 1.8, 1.7], [3.1, 2.6, 2.1, 1.9, 1.8])


def test_a_curve_inside_the_seeds_spread_never_leaves():
    found = departure(FULL, curves([3.05, 2.55, 2.05, 1.85, 1.75], [3.0, 2.6, 2.0, 1.9, 1.7]))
    assert found.judged and found.index is None
    assert found.describe(FULL.steps, FULL.tokens) == "never left"


def test_a_curve_that_leaves_then_comes_back_has_not_left():
    found = departure(FULL, curves([3.05, 2.9, 2.8, 1.85, 1.75], [3.0, 2.95, 2.85, 1.9, 1.72]))
    assert found.index is None


def test_a_curve_outside_for_good_departs_at_the_first_point_of_the_last_stretch():
    # Outside at point 1, back inside at 2, then outside from 3 on: the departure is point 3 (step 4, 400 tokens).
    run = curves([3.05, 2.9, 2.05, 2.2, 2.3], [3.0, 2.95, 2.1, 2.25, 2.35])
    found = departure(FULL, run)
    assert (found.index, found.side) == (3, "above")
    assert found.describe(run.steps, run.tokens) == "step 4 (400 tokens), above"
    assert departure(FULL, curves([3.05, 2.9, 2.8, 2.7, 2.6], [3.0, 2.95, 2.85, 2.75, 2.65])).index == 1


def test_one_seed_has_no_spread_to_leave():
    assert not departure(curves([3.0, 2.0]), curves([3.5, 2.5])).judged


def test_seed_curves_keep_the_steps_every_seed_scored():
    logs = [
        [
            {"step": 1, "dev_loss": 3.0, "tokens_seen": 10},
            {"step": 2, "train_loss": 2.0},
            {"step": 4, "dev_loss": 2.0, "tokens_seen": 40},
        ],
        [{"step": 1, "dev_loss": 3.2, "tokens_seen": 10}, {"step": 4, "dev_loss": 2.2, "tokens_seen": 40}],
    ]
    curve = seed_curves(logs)
    assert curve.steps == [1, 4] and curve.tokens == [10, 40] and curve.band(1) == (2.0, 2.2)


def test_training_fractions_are_nested_and_cut_the_training_split_alone(processed_dir):
    trees = [f"tree-{index}" for index in range(2000)]
    quarter, half, whole = (set(subset_indices(trees, fraction)) for fraction in (0.25, 0.5, 1.0))
    assert quarter < half < whole and len(whole) == len(trees)
    assert 0.2 < len(quarter) / len(trees) < 0.3 and 0.45 < len(half) / len(trees) < 0.55
    assert all(in_fraction(tree, 0.5) for tree in (trees[i] for i in quarter))
    splits = datasets.load_from_disk(str(processed_dir))
    train = splits["train"]
    kept = training_subset(train, 0.5)
    assert 0 < len(kept) < len(train) and set(kept["message_tree_id"]) <= set(train["message_tree_id"])
    # Every response of a kept tree is kept: a tree is never split between in and out.
    kept_trees = set(kept["message_tree_id"])
    assert len(kept) == sum(tree in kept_trees for tree in train["message_tree_id"])
    assert kept_trees <= set(training_subset(train, 0.75)["message_tree_id"])
    assert training_subset(train, 1.0) is train
    # Dev and test are other trees, never read by the cut.
    assert not kept_trees & (set(splits["dev"]["message_tree_id"]) | set(splits["test"]["message_tree_id"]))
