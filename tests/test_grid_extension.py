"""Grids that widen themselves: a choice at an end of its grid adds the next rate beyond it (the grid's own spacing),
trains it with the sweep seeds and chooses again, up to [budget] grid_extensions; a diverged training is the worst
rate, never an error; a resumed study redoes no finished extension."""

import json
import math
from types import SimpleNamespace

import pytest
from conftest import one_run_study

from studykit import study_state
from studykit.grid_extension import diverged_rates, edge_side, extension_for, rate_beyond
from studykit.run_dir import DIVERGED_RECORD
from studykit.study import run_study
from studykit.study_config import StudyConfig
from studykit.study_file import load_study
from studykit.study_state import STARTED_FILE, mark_current, sweep_result, training_inputs


def test_the_next_rate_repeats_the_grids_own_log_spacing():
    assert rate_beyond([1e-4, 3e-4, 1e-3], "above") == 3e-3
    assert rate_beyond([1e-4, 3e-4, 1e-3], "below") == 3e-5
    assert rate_beyond([1e-4, 3e-4, 1e-3, 3e-3], "above") == 1e-2
    assert rate_beyond([3e-4, 1e-3], "above") == 3e-3 and rate_beyond([3e-3, 1e-2], "below") == 1e-3
    assert rate_beyond([1e-3, 1e-2], "below") == 1e-4 and rate_beyond([1e-6, 2e-6, 4e-6], "above") == 8e-6
    assert rate_beyond([1e-4, 2e-4, 5e-4], "above") == pytest.approx(5e-4 * 5**0.5, rel=1e-5)
    assert edge_side([1e-4, 1e-3, 1e-2], 1e-2) == "above" and edge_side([1e-4, 1e-3, 1e-2], 1e-4) == "below"
    assert edge_side([1e-4, 1e-3, 1e-2], 1e-3) is None
    assert extension_for([1e-4, 1e-3], 1e-3, added_so_far=2, bound=2) is None
    assert extension_for([1e-4, 1e-3], 1e-3, added_so_far=0, bound=2).lr == 1e-2


def test_a_rate_far_above_the_best_or_not_finite_is_labelled_diverged():
    assert diverged_rates({1e-4: 2.0, 1e-3: 1.5, 1e-2: 2.4, 3e-2: 2.6, 1e-1: math.inf, 1.0: None}) == [3e-2, 1e-1, 1.0]


def fake_sweep(monkeypatch, loss_at, unfinished=()):
    """Finished sweep trainings whose final dev loss is loss_at(lr); rates in `unfinished` have not trained yet."""
    monkeypatch.setattr(
        study_state,
        "finished_record",
        lambda training, fingerprint, adopt=True: (
            None
            if any(math.isclose(training.lr, u) for u in unfinished)
            else SimpleNamespace(final_dev_loss=loss_at(training.lr))
        ),
    )


def three_rate_study(tmp_path, extensions=None):
    path = one_run_study(tmp_path / "study.toml")
    text = path.read_text().replace("lr = 1e-3", "lr = [1e-4, 1e-3, 1e-2]")
    if extensions is not None:
        text = text.replace("grid_extensions = 2", f"grid_extensions = {extensions}")
    path.write_text(text)
    study = load_study(path)
    return study, study.runs[0]


def test_a_choice_at_the_top_adds_rates_above_until_the_bound_and_only_then_is_flagged(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path)
    assert study.grid_extensions == 2
    # Ever better with a larger rate: two rates are added above, and the bound stops the search at the top.
    fake_sweep(monkeypatch, lambda lr: -math.log10(lr))
    result = sweep_result(study, spec, "fingerprint")
    assert result.learning_rates == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert [e.lr for e in result.added] == [1e-1, 1.0] and all(e.side == "above" for e in result.added)
    assert "was the largest rate" in result.added[0].reason and "extension 2 of at most 2" in result.added[1].reason
    assert result.chosen_lr == 1.0 and result.at_edge
    recorded = result.to_dict()
    assert [a["lr"] for a in recorded["added"]] == [1e-1, 1.0] and recorded["at_edge"]
    # The best rate is the first added one: the second added rate is worse, the choice lies inside, nothing flagged.
    fake_sweep(monkeypatch, lambda lr: abs(math.log10(lr) + 1))
    result = sweep_result(study, spec, "fingerprint")
    assert result.chosen_lr == pytest.approx(1e-1) and not result.at_edge and len(result.added) == 2
    # The bottom widens downwards.
    fake_sweep(monkeypatch, lambda lr: math.log10(lr))
    assert [e.side for e in sweep_result(study, spec, "fingerprint").added] == ["below", "below"]


def test_no_extension_with_a_bound_of_zero_flags_the_edge_at_once(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path, extensions=0)
    fake_sweep(monkeypatch, lambda lr: -math.log10(lr))
    result = sweep_result(study, spec, "fingerprint")
    assert result.added == [] and result.chosen_lr == 1e-2 and result.at_edge


def test_an_added_rate_not_yet_trained_is_pending_and_nothing_is_chosen(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path)
    fake_sweep(monkeypatch, lambda lr: -math.log10(lr), unfinished=(1e-1,))
    result = sweep_result(study, spec, "fingerprint")
    assert result.chosen_lr is None and result.pending == ["full_ft__lr1e-1__seed0"]
    assert result.learning_rates == [1e-4, 1e-3, 1e-2, 1e-1]


def test_a_diverging_added_rate_is_the_worst_rate_not_an_error(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path)
    fake_sweep(monkeypatch, lambda lr: 3 + 0.1 * math.log10(1 / lr) if lr < 0.05 else float("nan"))
    result = sweep_result(study, spec, "fingerprint")
    assert result.chosen_lr == 1e-2 and not result.at_edge and result.diverged == [1e-1]
    # A training the trainer stopped on a NaN loss (its diverged.json, started from these inputs) counts as inf.
    training = study.training(spec, 1e-1, 0)
    monkeypatch.setattr(
        study_state,
        "finished_record",
        lambda t, fingerprint, adopt=True: (
            None if t.lr == 1e-1 else SimpleNamespace(final_dev_loss=3 + 0.1 * math.log10(1 / t.lr))
        ),
    )
    run_dir = tmp_path / "run"
    training.config.output_dir = str(run_dir)
    monkeypatch.setattr(
        study, "training", lambda s, lr, seed: training if lr == 1e-1 else type(study).training(study, s, lr, seed)
    )
    assert sweep_result(study, spec, "fingerprint").pending == [training.name]
    run_dir.mkdir()
    mark_current(run_dir, training_inputs(training, "fingerprint"), STARTED_FILE)
    (run_dir / DIVERGED_RECORD).write_text(json.dumps({"reason": "NaN", "step": 3}))
    result = sweep_result(study, spec, "fingerprint")
    assert result.pending == [] and result.chosen_lr == 1e-2 and result.diverged == [1e-1]
    assert result.to_dict()["dev_loss"][repr(1e-1)] is None
    # Started from other inputs (another data fingerprint), the record is not this training's.
    assert sweep_result(study, spec, "other").pending


def test_a_study_widens_its_grid_records_why_and_a_second_run_redoes_no_extension(tmp_path):
    """Rates far too small for 6 steps: the largest wins, two rates are added above, and the bound flags the edge."""
    path = one_run_study(tmp_path / "study.toml", lr="[1e-6, 2e-6]")
    output_dir = tmp_path / "out"
    first = run_study(StudyConfig(config=str(path), output_dir=str(output_dir)))
    names = [f"full_ft__lr{lr}__seed0" for lr in ("1e-6", "2e-6", "4e-6", "8e-6")]
    assert sorted(first["trained"]) == sorted(names)
    results = json.loads((output_dir / "results" / "results.json").read_text())
    sweep = results["rows"][1]["sweep"]
    assert [a["lr"] for a in sweep["added"]] == [4e-6, 8e-6] and all(a["reason"] for a in sweep["added"])
    assert sweep["learning_rates"] == [1e-6, 2e-6, 4e-6, 8e-6] and sweep["chosen_lr"] == 8e-6 and sweep["at_edge"]
    assert {t["name"] for t in results["trainings"]} == set(names)
    markdown = (output_dir / "results" / "results.md").read_text()
    assert "+4e-06" in markdown and "after 2 added rate(s), the bound" in markdown
    second = run_study(StudyConfig(config=str(path), output_dir=str(output_dir)))
    assert second["trained"] == [] and sorted(second["kept"]) == sorted(names) and not second["reported"]


def test_the_dry_run_says_the_number_of_trainings_can_grow_and_by_how_much(tmp_path, capsys):
    path = one_run_study(tmp_path / "study.toml", lr="[1e-6, 2e-6]")
    run_study(StudyConfig(config=str(path), output_dir=str(tmp_path / "never"), dry_run=True))
    printed = capsys.readouterr().out
    assert "estimate: 2 training(s) to run" in printed
    assert "the number of trainings can grow" in printed and "at most 2 more training(s)" in printed
    assert "up to 2 more time(s) (2 training(s) at most)" in printed and not (tmp_path / "never").exists()


def test_a_sweep_training_that_really_diverges_is_the_worst_rate_and_the_study_goes_on(tmp_path, monkeypatch):
    """A rate so large the loss turns NaN: the trainer stops it and records why, the study counts it as the worst
    rate and chooses the other; a second run keeps it rather than training it again."""
    path = one_run_study(tmp_path / "study.toml", lr="[1e-3, 1e5]")
    path.write_text(path.read_text().replace("grid_extensions = 2", "grid_extensions = 0\nmax_grad_norm = 0.0"))
    output_dir = tmp_path / "out"
    first = run_study(StudyConfig(config=str(path), output_dir=str(output_dir)))
    assert first["diverged"] == ["full_ft__lr1e5__seed0"] and first["chosen"] == {"full_ft": 1e-3}
    assert (output_dir / "checkpoints" / "full_ft__lr1e5__seed0" / DIVERGED_RECORD).exists()
    sweep = json.loads((output_dir / "results" / "results.json").read_text())["rows"][1]["sweep"]
    assert sweep["diverged"] == [1e5] and sweep["dev_loss"][repr(1e5)] is None
    second = run_study(StudyConfig(config=str(path), output_dir=str(output_dir)))
    assert second["trained"] == [] and "full_ft__lr1e5__seed0" in second["kept"]
