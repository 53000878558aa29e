"""The study runner on the quick study: every report file, nothing redone twice, only a changed run redone, a
mismatched budget flagged, bootstrap intervals that behave, and a README block replaced without touching the rest."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import (
    ONE_RUN_TRAINING,
    QUICK,
    REPO_ROOT,
    one_run_study,
    refused,
    run_script,
    shortened_quick_study,
)

from studykit import comparison, report, report_markdown, statistics
from studykit.config import TrainConfig
from studykit.errors import UserError
from studykit.evaluate import read_extra_eval_texts
from studykit.study import run_study
from studykit.study_config import StudyConfig
from studykit.study_file import load_study, lr_label

RUNS = ["full_ft", "lora_r8", "lora_r32", "lora_r8_all_linear", "full_ft_half", "lora_r8_half"]
# The quick preset's grids (two rates a run, before any rate added beyond an end) and seeds (0, 1; the sweep with 0).
GRIDS = {
    "full_ft": ["3e-4", "1e-3"],
    "lora_r8": ["3e-3", "1e-2"],
    "lora_r32": ["3e-3", "1e-2"],
    "lora_r8_all_linear": ["3e-3", "1e-2"],
    "full_ft_half": ["3e-4", "1e-3"],
    "lora_r8_half": ["3e-3", "1e-2"],
}


def sweep_trainings(run: str) -> list[str]:
    return [f"{run}__lr{lr}__seed0" for lr in GRIDS[run]]


def swept_rates(results: dict, run: str) -> list[float]:
    """The run's grid with the rates added beyond its ends, as results.json records them."""
    return next(row for row in results["rows"] if row["name"] == run)["sweep"]["learning_rates"]


def trainings_of(results: dict, run: str) -> list[str]:
    """The run's chosen rate with both seeds, as the report names them."""
    return next(row for row in results["rows"] if row["name"] == run)["trainings"]


def record_mtimes(root: Path) -> dict[str, float]:
    return {path.parent.name: path.stat().st_mtime_ns for path in (root / "checkpoints").glob("*/run.json")}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One quick study, run three times: fresh, unchanged, and with one run's budget changed. Built once per test
    session: the test workers share it through a directory both see, the first to come builds it under a lock."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # one per session, above every worker's own directory
    with FileLock(str(shared / "quick_study.lock")):
        root = shared / "quick_study"
        if not (root / "fixture.json").exists():
            build_quick_study(root)
    fixture = json.loads((root / "fixture.json").read_text())
    with np.load(root / "per_response_first.npz") as arrays:
        fixture["per_response_first"] = {key: arrays[key] for key in arrays.files}
    fixture.update(
        root=root, output=root / "quick", readme=root / "README.md", readme_before=(root / "README.before").read_bytes()
    )
    return fixture


def build_quick_study(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    output_dir = root / "quick"
    config_file = shortened_quick_study(root / "quick.toml")
    readme = root / "README.md"
    readme.write_text(
        (REPO_ROOT / "README.md").read_text()
        if "<!-- results:start -->" in (REPO_ROOT / "README.md").read_text()
        else "# Kit\n\n## Results\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\n## After\ntext\n"
    )
    (root / "README.before").write_bytes(readme.read_bytes())

    first = run_study(StudyConfig(config=str(config_file), output_dir=str(output_dir)))
    mtimes_first = record_mtimes(output_dir)
    results_first = json.loads((output_dir / "results" / "results.json").read_text())
    (root / "per_response_first.npz").write_bytes((output_dir / "results" / "per_response_nll.npz").read_bytes())
    second = run_study(StudyConfig(config=str(config_file), output_dir=str(output_dir), readme=str(readme)))
    mtimes_second = record_mtimes(output_dir)
    # lora_r8 alone gets another number of steps: it alone is retrained, and the report must flag it.
    changed_file = shortened_quick_study(root / "changed.toml", ('name = "lora_r8"', 'name = "lora_r8"\nmax_steps = 3'))
    third = run_study(StudyConfig(config=str(changed_file), output_dir=str(output_dir)))
    fixture = {
        "first": first,
        "second": second,
        "third": third,
        "results_first": results_first,
        "mtimes_first": mtimes_first,
        "mtimes_second": mtimes_second,
        "mtimes_third": record_mtimes(output_dir),
    }
    # Written last: its presence tells the other test workers the study is complete.
    (root / "fixture.json").write_text(json.dumps(fixture, default=str))


def test_quick_study_writes_every_report_file(study):
    results_dir = study["output"] / "results"
    figures = (
        "loss_curves.png",
        "perplexity_vs_params.png",
        "dev_perplexity_vs_lr.png",
        "learn_forget.png",
        "cost_vs_quality.png",
        "learning_curves.png",
        "gap_vs_data_size.png",
    )
    for name in ("results.json", "results.md", "samples.md", *figures):
        assert (results_dir / name).stat().st_size > 0, name
    for figure in figures:
        assert (results_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = study["first"]
    # Every rate of each grid, with the rates added beyond its ends, with seed 0; then the chosen rate with seed 1.
    results = study["results_first"]
    expected = sum(len(swept_rates(results, run)) + 1 for run in RUNS)
    assert len(first["trained"]) == expected and first["prepared"] and first["evaluated"] and first["reported"]
    assert set(first["trained"]) >= {name for run in RUNS for name in sweep_trainings(run)}
    assert set(first["chosen"]) == set(RUNS)


def test_each_rate_is_chosen_on_dev_as_the_lowest_final_dev_loss_and_an_edge_is_flagged(study):
    results = study["results_first"]
    flagged = []
    for run in RUNS:
        row = next(row for row in results["rows"] if row["name"] == run)
        sweep = row["sweep"]
        losses = {lr: sweep["dev_loss"][repr(lr)] for lr in sweep["learning_rates"]}
        if run != "lora_r8":  # the fixture's third study trains lora_r8 again, into the same directories
            assert losses == {
                lr: json.loads(
                    (study["output"] / "checkpoints" / f"{run}__lr{lr_label(lr)}__seed0" / "run.json").read_text()
                )["final_dev_loss"]
                for lr in sweep["learning_rates"]
            }
        best = min(losses, key=losses.get)
        assert row["lr"] == pytest.approx(best) and sweep["chosen_lr"] == pytest.approx(best)
        # A two-rate grid always chooses at an end first: a rate is added beyond it, and again while the choice
        # stays at an end, twice at most; only a choice still at an end after the second is flagged.
        assert 1 <= len(sweep["added"]) <= 2 and [float(r) for r in GRIDS[run]] == [
            lr for lr in sweep["learning_rates"] if lr not in {a["lr"] for a in sweep["added"]}
        ]
        at_end = best in (min(sweep["learning_rates"]), max(sweep["learning_rates"]))
        assert sweep["at_edge"] == (at_end and len(sweep["added"]) == 2)
        assert (len(sweep["added"]) == 2) or not at_end, "a choice inside the grid stops the widening"
        flagged += [run] if sweep["at_edge"] else []
        assert [name.split("__")[1] for name in row["trainings"]] == [f"lr{lr_label(best)}"] * 2
        assert [name.split("__")[2] for name in row["trainings"]] == ["seed0", "seed1"]
    markdown = (study["output"] / "results" / "results.md").read_text()
    assert ("the bound: widen the grid" in markdown) == bool(flagged)


def test_results_json_rows_hold_the_measurements(study):
    results = study["results_first"]
    assert results["study_config"]["study"]["name"] == "quick" and len(results["code_version"]) == 12
    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == ["base", *RUNS]
    assert rows["full_ft"]["trainable_params"] == rows["full_ft"]["total_params"]
    assert rows["lora_r32"]["trainable_params"] == 4 * rows["lora_r8"]["trainable_params"]
    assert rows["lora_r8_all_linear"]["trainable_params"] > rows["lora_r8"]["trainable_params"]
    per_response = study["per_response_first"]
    tokens = per_response["base/tokens"]
    extra_tokens = per_response["extra/base/tokens"]
    for name in RUNS:
        row, trainings = rows[name], trainings_of(results, name)
        # The mean over seeds of each seed's token-weighted test perplexity, recomputed from the per-response scores.
        per_seed = [math.exp(per_response[f"{t}/nll"].sum() / tokens.sum()) for t in trainings]
        assert row["test"]["mean_perplexity"] == pytest.approx(sum(per_seed) / len(per_seed))
        assert (
            row["test"]["seed_count"] == 2
            and row["test"]["ci_low"] <= row["test"]["mean_perplexity"] <= row["test"]["ci_high"]
        )
        assert "seeds" in row["test"]["covers"] and "trees" in row["test"]["covers"]
        # Forgetting: the change in NLL per token on general text from the base model, seed by seed, then the mean.
        changes = [
            (per_response[f"extra/{t}/nll"].sum() - per_response["extra/base/nll"].sum()) / extra_tokens.sum()
            for t in trainings
        ]
        assert row["forgetting"]["change"] == pytest.approx(sum(changes) / len(changes))
        if name != row["reference"]:
            # Compared with full fine-tuning on the same share of the training data.
            assert row["reference"] == ("full_ft_half" if name.endswith("_half") else "full_ft")
            reference = trainings_of(results, row["reference"])
            ratios = [
                math.exp((per_response[f"{t}/nll"].sum() - per_response[f"{r}/nll"].sum()) / tokens.sum())
                for t, r in zip(trainings, reference)
            ]
            assert row["vs_reference"]["ratio"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
            assert row["vs_reference"]["ci_low"] <= row["vs_reference"]["ratio"] <= row["vs_reference"]["ci_high"]
        assert (
            row["steps"] == 6
            and row["tokens_seen"] > 0
            and row["peak_memory_bytes"] > 0
            and row["checkpoint_bytes"] > 0
        )
        assert row["budget_differences"] == {}
    # Every training's numbers, the rates not chosen among them; only the chosen ones were scored on test.
    assert sorted(entry["name"] for entry in results["trainings"]) == sorted(study["first"]["trained"])
    scored = {entry["name"] for entry in results["trainings"] if "test_perplexity" in entry}
    assert scored == {t for name in RUNS for t in trainings_of(results, name)}
    assert set(results["pareto_front"]) == {"peak_memory_bytes", "wall_time_seconds", "train_flops"}


def test_results_md_and_samples(study):
    markdown = (study["output"] / "results" / "results.md").read_text()
    protocol = study["results_first"]["protocol"]
    assert "Budget, the same for every run: 6 optimizer steps" in protocol and "lowest final dev loss" in protocol
    assert "Nothing that chooses reads the test split" in protocol
    assert "each on its own, without its prompt" in protocol and "same data order per seed, AdamW (betas" in protocol
    for text in (
        "Test perplexity: mean ± seed sd [95% CI]",
        "Ratio to full_ft",
        "Forgetting: Δ NLL/token vs base",
        "Peak memory",
        "Checkpoint",
        "Same budget",
        "**Protocol.**",
        "## Learning-rate sweeps",
        "resamples whole conversation trees",
        "The learning rate differs by design",
        "dev_perplexity_vs_lr.png",
        "learn_forget.png",
        "cost_vs_quality.png",
        "## When LoRA falls behind",
        "learning_curves.png",
        "## The gap by data size",
        "gap_vs_data_size.png",
    ):
        assert text in markdown, text
    # Each LoRA run's departure from the full fine-tuning curve of its data share, in steps and tokens or "never".
    # The report now on disk (the fixture's third study rewrote it), which results.md was written with.
    current = json.loads((study["output"] / "results" / "results.json").read_text())
    curves = current["learning_curves"]
    for name in RUNS:
        departure = curves[name].get("departure")
        assert (departure is None) == name.startswith("full_ft"), name
        if departure:
            assert departure["text"] == "never left" or departure["step"] in curves[name]["steps"]
            assert f"| {name} | {curves[name]['reference']} | {departure['text']} |" in markdown
    # The log schedule: dev loss after steps 1, 2, 4 and the last (6), and every eval_every (3).
    assert curves["full_ft"]["steps"] == [1, 2, 3, 4, 6]
    sizes = current["data_size"]
    assert sizes["fractions"] == [0.5, 1.0] and list(sizes["shapes"]) == ["LoRA r=8 a=16 attention"]
    assert [p["run"] for p in sizes["shapes"]["LoRA r=8 a=16 attention"]["points"]] == ["lora_r8_half", "lora_r8"]
    assert "| base |" in markdown and all(f"| {name} |" in markdown for name in RUNS)
    samples = (study["output"] / "results" / "samples.md").read_text()
    prompts = json.loads((study["output"] / "processed" / "prompts.json").read_text())
    assert prompts and prompts[0]["text"].strip().splitlines()[0] in samples
    assert all(f"**{name}**" in samples for name in ["base", *RUNS])


def test_second_run_redoes_nothing(study):
    second = study["second"]
    assert second["trained"] == [] and sorted(second["kept"]) == sorted(study["first"]["trained"])
    assert not (second["prepared"] or second["evaluated"] or second["reported"] or second["tiny_model_built"])
    assert study["mtimes_second"] == study["mtimes_first"]


def test_changed_run_alone_is_redone_and_its_budget_flagged(study):
    third = study["third"]
    retrained = {name.split("__")[0] for name in third["trained"]}
    results = json.loads((study["output"] / "results" / "results.json").read_text())
    assert retrained == {"lora_r8"} and len(third["trained"]) == len(swept_rates(results, "lora_r8")) + 1
    assert third["evaluated"] and third["reported"] and not third["prepared"]
    assert all(
        study["mtimes_third"][name] == study["mtimes_second"][name]
        for name in study["mtimes_second"]
        if not name.startswith("lora_r8__")
    )
    rows = {row["name"]: row for row in json.loads((study["output"] / "results" / "results.json").read_text())["rows"]}
    assert rows["lora_r8"]["budget_differences"] == {"steps": 3}
    assert rows["lora_r32"]["budget_differences"] == {}
    lines = {}
    for line in (study["output"] / "results" / "results.md").read_text().splitlines():
        if line.startswith("| "):
            lines.setdefault(line.split("|")[1].strip(), line)  # the main table comes first, the sweep table after it
    assert "**NO: steps=3**" in lines["lora_r8"] and lines["lora_r32"].rstrip(" |").endswith("yes")
    markdown = (study["output"] / "results" / "results.md").read_text()
    assert "**steps differs** (lora_r8: 3)" in markdown
    assert "Budget, the same for every run" not in markdown and "runs flagged in the table differ" in markdown


def test_readme_block_replaced_and_the_rest_untouched(study):
    before, after = study["readme_before"], study["readme"].read_bytes()
    start, end = b"<!-- results:start -->", b"<!-- results:end -->"
    assert after[: after.index(start)] == before[: before.index(start)]
    assert after[after.index(end) :] == before[before.index(end) :]
    block = after[after.index(start) + len(start) : after.index(end)].decode()
    assert "**Protocol.**" in block and "| lora_r32 |" in block and "Test perplexity: mean ± seed sd [95% CI]" in block
    assert study["second"]["readme"] == str(study["readme"])


def test_interrupted_run_is_resumed_by_the_next_study_run_and_ends_as_if_never_stopped(tmp_path, capsys):
    from safetensors.torch import load_file

    output_dir = tmp_path / "quick"
    run_dir = output_dir / "checkpoints" / ONE_RUN_TRAINING
    config = StudyConfig(config=str(one_run_study(tmp_path / "one.toml")), output_dir=str(output_dir))
    run_study(config)
    straight_log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    straight_weights = load_file(run_dir / "model.safetensors")
    first_scores = (output_dir / "results" / "perplexity.json").stat().st_mtime_ns

    # What a crash during step 6 leaves: checkpoints of steps 2 and 4, the log up to step 5, no weights, no record.
    (run_dir / "run.json").unlink()
    (run_dir / "model.safetensors").unlink()
    (run_dir / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in straight_log[:5]))
    capsys.readouterr()
    run_study(dataclasses.replace(config, dry_run=True))
    assert "resume the unfinished training from step-000004" in capsys.readouterr().out

    resumed = run_study(config)
    assert "resuming the unfinished training from step-000004" in capsys.readouterr().out
    assert (
        resumed["resumed"] == [ONE_RUN_TRAINING] == resumed["trained"] and resumed["evaluated"] and resumed["reported"]
    )
    resumed_log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in resumed_log] == [1, 2, 3, 4, 5, 6]
    assert [entry["train_loss"] for entry in resumed_log] == pytest.approx(
        [entry["train_loss"] for entry in straight_log], rel=1e-6
    )
    for name, weight in load_file(run_dir / "model.safetensors").items():
        assert weight.allclose(straight_weights[name], atol=1e-6), name
    assert (output_dir / "results" / "perplexity.json").stat().st_mtime_ns != first_scores

    # An unfinished training of other inputs is never continued: its steps would mix two settings.
    (run_dir / "run.json").unlink()
    changed = run_study(
        StudyConfig(config=str(one_run_study(tmp_path / "changed.toml", steps=8)), output_dir=str(output_dir))
    )
    assert changed["trained"] == [ONE_RUN_TRAINING] and changed["resumed"] == []
    retrained_log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in retrained_log] == list(range(1, 9)) and retrained_log[1]["lr"] != straight_log[
        1
    ]["lr"]


def test_ctrl_c_during_a_study_saves_the_run_and_the_same_command_continues_it(tmp_path):
    output_dir = tmp_path / "quick"
    log = output_dir / "checkpoints" / ONE_RUN_TRAINING / "log.jsonl"
    command = [
        sys.executable,
        str(REPO_ROOT / "run_study.py"),
        "--config",
        str(one_run_study(tmp_path / "one.toml", steps=60)),
        "--output-dir",
        str(output_dir),
    ]
    # Its own process group, as in a terminal: Ctrl-C reaches the runner and the training process alike.
    study = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert study.poll() is None and time.monotonic() < deadline, study.communicate()
        time.sleep(0.02)
    os.killpg(study.pid, signal.SIGINT)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: ") and "run the command again" in stderr
    assert not (log.parent / "run.json").exists()
    stopped_at = len(log.read_text().splitlines())
    assert 3 <= stopped_at < 60

    result = run_study(StudyConfig(config=command[3], output_dir=str(output_dir)))
    assert result["resumed"] == [ONE_RUN_TRAINING] and result["evaluated"]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert json.loads((log.parent / "run.json").read_text())["steps"] == 60


def test_replace_marked_block_needs_both_markers():
    text = "a\n<!-- results:start -->\nx\n<!-- results:end -->\nb\n"
    assert (
        report.replace_marked_block(text, "new", "README.md")
        == "a\n<!-- results:start -->\nnew\n<!-- results:end -->\nb\n"
    )
    with pytest.raises(UserError, match="no '<!-- results:start -->'"):
        report.replace_marked_block("a\n<!-- results:end -->\n<!-- results:start -->\n", "new", "README.md")


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    output_dir = tmp_path / "never"
    result = run_script("run_study.py", "--preset", "quick", "--output-dir", output_dir, "--dry-run")
    for step in (
        "tiny model",
        "prepare",
        "run full_ft",
        "run lora_r8",
        "run lora_r32",
        "run lora_r8_all_linear",
        "evaluate",
        "report",
        "README",
        "full_ft__lr3e-4__seed0",
    ):
        assert step in result.stdout, step
    assert "then 1 more at the rate with the lowest dev loss" in result.stdout
    # 6 runs x (2 rates with seed 0 + the chosen rate with seed 1), at most full-length sequences, over the assumed
    # rate; and up to 2 rates more a run, added beyond a grid's end.
    assert "estimate: 18 training(s) to run" in result.stdout and "--assume-tflops" in result.stdout
    assert "the number of trainings can grow" in result.stdout and "at most 12 more training(s)" in result.stdout
    assert "leave alone" in result.stdout and not output_dir.exists()


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def responses(count):
        tokens = rng.integers(5, 60, size=count)
        return rng.gamma(4.0, 0.8, size=count) * tokens, tokens

    widths = []
    for count in (40, 4000):
        nll, tokens = responses(count)
        low, high = statistics.perplexity_interval(nll, tokens, resamples=1000, seed=0)
        assert low < math.exp(nll.sum() / tokens.sum()) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4


def test_too_few_texts_get_no_interval_rather_than_a_misleading_one():
    """Two texts: resampling them gives back their own perplexities, which the table would show as a narrow '95%
    interval'."""
    nll, tokens = np.array([300.0, 510.0]), np.array([50, 80])
    assert statistics.perplexity_interval(nll, tokens, resamples=200, seed=0) is None
    assert statistics.paired_ratio(nll, nll * 1.1, tokens, resamples=200, seed=0)["ci_low"] is None
    assert report_markdown.format_interval(502.2, None, None) == "502.200 (no interval)"
    count = statistics.MIN_TEXTS_FOR_INTERVAL
    assert statistics.perplexity_interval(np.full(count, 100.0), np.full(count, 20), resamples=200, seed=0) is not None


def test_paired_ratio_cancels_what_both_models_share():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 60, size=500)
    shared_difficulty = rng.gamma(2.0, 1.5, size=500) * tokens
    reference = shared_difficulty
    better = shared_difficulty * 0.9
    paired = statistics.paired_ratio(better, reference, tokens, resamples=1000, seed=0)
    assert paired["ratio"] == pytest.approx(math.exp(-0.1 * shared_difficulty.sum() / tokens.sum()))
    assert paired["ci_low"] <= paired["ratio"] <= paired["ci_high"] < 1
    same = statistics.paired_ratio(reference, reference, tokens, resamples=200, seed=0)
    assert same == {"ratio": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_budget_differences_name_each_differing_field_and_ignore_the_learning_rate():
    kernels = {"attention": "sdpa", "mlp_activation": "tanh GELU", "loss": "chunks"}
    shared = {
        "training_data_fingerprint": "a",
        "dev_fingerprint": "v",
        "seq_len": 64,
        "effective_batch": 8,
        "steps": 10,
        "seed": 1,
        "packing": False,
        "kernels": kernels,
        "precision": "fp32",
        "optimizer": "adamw",
    }
    eager = {**kernels, "attention": "eager"}
    records = {
        "full": {**shared, "config": {"lr": 1e-4}},
        "lora": {**shared, "config": {"lr": 1e-3}},
        "other": {**shared, "seed": 2, "effective_batch": 16, "config": {"lr": 1e-3}},
        "eager": {**shared, "kernels": eager, "config": {"lr": 1e-3}},
    }
    records = {name: SimpleNamespace(**fields) for name, fields in records.items()}  # run records, by attribute
    assert comparison.budget_differences(records, "full") == {
        "full": {},
        "lora": {},
        "other": {"effective_batch": 16, "seed": 2},
        "eager": {"kernels": eager},
    }


def test_study_file_mistakes_are_one_sentence(tmp_path):
    typo = shortened_quick_study(tmp_path / "typo.toml", ("rank = 8", "rnak = 8"))
    with pytest.raises(UserError, match="unknown setting.*rnak"):
        load_study(typo)
    owned = shortened_quick_study(tmp_path / "owned.toml", ('name = "lora_r8"', 'name = "lora_r8"\noutput_dir = "x"'))
    with pytest.raises(UserError, match="runner sets"):
        load_study(owned)
    with pytest.raises(UserError, match="no preset 'nope'"):
        run_study(StudyConfig(preset="nope"))


def test_extra_eval_text_file_splits_at_blank_lines_else_lines(tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("First line\nstill first.\n\n  \nSecond.\n")
    assert read_extra_eval_texts(str(paragraphs)) == ["First line\nstill first.", "Second."]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n")
    assert read_extra_eval_texts(str(lines)) == ["one", "two"]


def test_shipped_studies_load_and_share_one_budget():
    for path in sorted((REPO_ROOT / "studies").glob("*.toml")):
        study = load_study(path)
        shared = [field.name for field in dataclasses.fields(TrainConfig) if field.name not in ("lr", "output_dir")]
        # A data-size axis trains each share for its own steps; the runs of one share share everything else.
        for fraction in {spec.config.train_fraction for spec in study.runs}:
            runs = [spec for spec in study.runs if spec.config.train_fraction == fraction]
            budgets = [{name: getattr(spec.config, name) for name in shared} for spec in runs]
            assert all(budget == budgets[0] for budget in budgets), (path.name, fraction)
        if study.name in ("quick", "capacity"):
            assert len({spec.config.train_fraction for spec in study.runs}) >= 2, "a data-size axis"
        if study.name in ("default", "rank_sweep", "quick", "capacity"):
            assert study.runs[0].config.eval_schedule == "log" and study.grid_extensions == 2, path.name
    default = load_study(REPO_ROOT / "studies" / "default.toml")
    assert [
        (spec.name, spec.method, getattr(spec.config, "rank", None), getattr(spec.config, "target_modules", None))
        for spec in default.runs
    ] == [
        ("full_ft", "full", None, None),
        ("lora_r8", "lora", 8, ["attention"]),
        ("lora_r32", "lora", 32, ["attention"]),
        ("lora_r8_all_linear", "lora", 8, ["all-linear"]),
    ]
    # Grids of four rates spanning the published ranges; three seeds, the sweep with the first.
    assert default.runs[0].learning_rates == [1e-5, 3e-5, 1e-4, 3e-4]
    assert all(spec.learning_rates == [1e-4, 3e-4, 1e-3, 3e-3] for spec in default.runs[1:])
    assert default.seeds == [0, 1, 2] and default.sweep_seeds == [0]
    assert default.model == "gpt2" and default.readme == REPO_ROOT / "README.md"
    assert load_study(QUICK).readme is None and load_study(REPO_ROOT / "studies" / "fixed_lr.toml").runs[
        0
    ].learning_rates == [5e-5]


# ---------------------------------------------------------------------------------------------------------
# A study file is checked whole before anything is built: a mistake in it never costs the runs ahead of it
# ---------------------------------------------------------------------------------------------------------


def refused_study(runner, study_file: Path, output_dir: Path) -> str:
    """run_study.py on a study it must refuse: one `error:` line, exit 2, and the study's directory never made."""
    line = refused(
        "run_study.py",
        "--config",
        study_file,
        "--no-readme",
        "--output-dir",
        output_dir,
        watch=(study_file.parent,),
        runner=runner,
    )
    assert not output_dir.exists()
    return line


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            ("lr = [3e-4, 1e-3]", 'lr = "1e-3"'),
            ["run 'full_ft'", 'lr = "1e-3"', "write a number above 0 or a list of them"],
        ),
        (
            ("[budget]\n", '[budget]\nlr = "1e-3"\n'),
            ["[budget]", 'lr = "1e-3"', "write a number above 0 or a list of them"],
        ),
        (("lr = [3e-4, 1e-3]", "lr = [3e-4, 3e-4]"), ["run 'full_ft'", "lists a learning rate twice"]),
        (("lr = [3e-4, 1e-3]", "lr = [0, 1e-3]"), ["run 'full_ft'", "lr = [0, 0.001]", "a number above 0"]),
        (("seeds = [0, 1]", "seeds = [0, 0]"), ["[budget]", "seeds = [0, 0]", "different whole numbers"]),
        (
            ("seeds = [0, 1]", "seeds = [0, 1]\nsweep_seeds = [5]"),
            ["[budget]", "sweep_seeds = [5]", "not all of them among seeds"],
        ),
        (("seeds = [0, 1]", "seeds = [0, 1]\nseed = 3"), ["[budget]", "both seed and seeds"]),
        (('name = "full_ft"', 'name = "full_ft"\nseed = 3'), ["run 'full_ft'", "its own seed", "[budget] seeds"]),
        (("rank = 8\n", "rank = 8.5\n"), ["run 'lora_r8'", "rank = 8.5", "takes a whole number"]),
        (
            ("rank = 8\n", 'rank = 8\ntarget_modules = "attention"\n'),
            [
                "run 'lora_r8'",
                'target_modules = "attention"',
                "takes a list of strings",
                'target_modules = ["attention"]',
            ],
        ),
        (("rank = 32\n", "rank = 32\nuse_rslora = 1\n"), ["run 'lora_r32'", "use_rslora = 1", "takes true or false"]),
        (("seq_len = 128", 'seq_len = "128"'), ["[data]", 'seq_len = "128"', "takes a whole number"]),
        (("batch_size = 16", "batch_size = [16]"), ["[eval]", "batch_size = [16]", "a list", "takes a whole number"]),
        (
            ('precision = "fp32"', 'precision = "fp64"'),
            ["[budget]", 'precision = "fp64"', "use one of ['auto', 'fp16', 'bf16', 'fp32']"],
        ),
        (("n_layer = 2", 'n_layer = "2"'), ["[tiny_model]", 'n_layer = "2"', "takes a whole number"]),
        (("sample_prompts = 3", "sample_prompts = 3.5"), ["[report]", "sample_prompts = 3.5", "takes a whole number"]),
    ],
    ids=[
        "run-lr-string",
        "budget-lr-string",
        "lr-twice",
        "lr-zero",
        "seeds-twice",
        "sweep-seeds-outside",
        "seed-and-seeds",
        "run-seed",
        "rank-fraction",
        "targets-not-a-list",
        "bool-as-number",
        "data",
        "eval",
        "choice",
        "tiny-model",
        "report",
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_table_key_value_and_type(tmp_path, in_process, edit, expected):
    line = refused_study(in_process, shortened_quick_study(tmp_path / "study.toml", edit), tmp_path / "out")
    for text in expected:
        assert text in line, (text, line)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("batch_size = 16", "batch_size = 0"), ["[eval] in ", "--batch-size must be at least 1 (got 0)"]),
        (("rank = 32\n", "rank = 0\n"), ["run 'lora_r32' in ", "positive rank", "rank=0"]),
        (("test_fraction = 0.15", "test_fraction = 1.5"), ["[data] in ", "--test-fraction must lie between 0 and 1"]),
    ],
    ids=["eval", "last-run", "data"],
)
def test_a_value_its_stage_refuses_is_reported_where_the_study_file_sets_it(tmp_path, in_process, edit, expected):
    line = refused_study(in_process, shortened_quick_study(tmp_path / "study.toml", edit), tmp_path / "out")
    for text in expected:
        assert text in line, (text, line)


def test_a_value_of_the_wrong_type_is_refused_by_the_real_interpreter(tmp_path):
    study_file = shortened_quick_study(tmp_path / "study.toml", ("lr = [3e-4, 1e-3]", 'lr = "1e-3"'))
    line = refused_study(None, study_file, tmp_path / "out")
    assert "run 'full_ft'" in line and 'lr = "1e-3"' in line and "a number above 0" in line


def test_lora_targets_of_the_last_run_are_checked_before_the_first_run_trains(tmp_path):
    # A real interpreter: the check builds the model's skeleton, and nothing it logs may join the error line.
    study_file = shortened_quick_study(
        tmp_path / "study.toml", ("rank = 32\n", 'rank = 32\ntarget_modules = ["nope"]\n')
    )
    line = refused_study(None, study_file, tmp_path / "out")
    assert "run 'lora_r32'" in line and "['nope']" in line and "use a preset" in line


def test_lora_targets_are_checked_on_a_local_base_model_and_its_config_must_load(tmp_path, in_process, tiny_model_dir):
    def study_on(model: Path, *edits) -> Path:
        text = shortened_quick_study(tmp_path / "study.toml", *edits).read_text()
        # The quick study without its [tiny_model]: [budget] names the base model, as studies/default.toml does.
        text = text[: text.index("[tiny_model]")] + text[text.index("[data]") :]
        (tmp_path / "study.toml").write_text(text.replace("[budget]\n", f'[budget]\nmodel = "{model}"\n'))
        return tmp_path / "study.toml"

    line = refused_study(
        in_process,
        study_on(tiny_model_dir, ("rank = 8\n", 'rank = 8\ntarget_modules = ["mlp.nope"]\n')),
        tmp_path / "out",
    )
    assert "run 'lora_r8'" in line and "['mlp.nope']" in line and "use a preset" in line
    empty = tmp_path / "empty_model"
    empty.mkdir()
    line = refused_study(in_process, study_on(empty), tmp_path / "out")
    assert f"could not read a model config from '{empty}'" in line and "set [budget] model" in line


def test_a_run_cannot_change_the_base_model_or_tokenizer(tmp_path, in_process):
    for key in ("model", "tokenizer"):
        study_file = shortened_quick_study(tmp_path / f"{key}.toml", ("rank = 8\n", f'rank = 8\n{key} = "gpt2"\n'))
        line = refused_study(in_process, study_file, tmp_path / "out")
        assert (
            "run 'lora_r8'" in line
            and f"sets ['{key}']" in line
            and f"set {key} once for the whole study in [budget]" in line
        )


def test_a_mistyped_budget_key_is_blamed_on_budget_not_a_run(tmp_path, in_process):
    study_file = shortened_quick_study(tmp_path / "study.toml", ("grad_accum = 2", "grad_acum = 2"))
    line = refused_study(in_process, study_file, tmp_path / "out")
    assert (
        line.startswith("error: [budget] in ")
        and "unknown setting(s) ['grad_acum']" in line
        and "did you mean ['grad_accum']" in line
    )
    assert "run '" not in line


def test_a_lora_setting_in_budget_is_refused_for_a_full_run_and_shared_by_lora_runs(tmp_path, in_process):
    study_file = shortened_quick_study(
        tmp_path / "study.toml", ("[budget]\n", '[budget]\ntarget_modules = ["attention+mlp"]\n')
    )
    line = refused_study(in_process, study_file, tmp_path / "out")
    assert "[budget]" in line and "['target_modules']" in line and "run 'full_ft' (method 'full') does not take" in line
    text = study_file.read_text()
    study_file.write_text(
        text[: text.index("[[runs]]")]
        + text[text.index('[[runs]]\nname = "lora_r8"') : text.index('[[runs]]\nname = "lora_r8_all_linear"')]
    )
    assert [spec.config.target_modules for spec in load_study(study_file).runs] == [
        ["attention+mlp"],
        ["attention+mlp"],
    ]
