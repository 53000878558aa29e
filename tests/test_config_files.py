"""Config files and overrides: each stage's --config FILE (its own saved *_config.json loads back as is, TOML too,
flags override it), run_study.py's --set TABLE.KEY=VALUE, and the console entry points the package installs."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import ONE_RUN_TRAINING, REPO_ROOT, one_run_study

from studykit.config import (
    LoraTrainConfig,
    PrepareConfig,
    TrainConfig,
    config_to_dict,
    option,
    parse_config,
    save_config,
)
from studykit.errors import UserError
from studykit.settings import build_parser, help_sections
from studykit.study_config import EvalConfig, StudyConfig
from studykit.study_file import load_study

QUICK = REPO_ROOT / "studies" / "quick.toml"


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(lr=3e-4, max_steps=7, precision="fp32", max_gpu_memory_gb=5.5, pad_to_multiple_of=16),
        LoraTrainConfig(rank=16, alpha=32.0, target_modules=["attention+mlp"], lr=1e-3, seed=3),
        PrepareConfig(seq_len=128, lang="en,de", dev_fraction=0.2, data_file="x.jsonl"),
        EvalConfig(runs=["a", "b"], batch_size=4),
    ],
    ids=lambda config: type(config).__name__,
)
def test_a_saved_config_loads_back_as_it_was(config, tmp_path):
    path = tmp_path / "saved_config.json"
    save_config(config, path)
    assert parse_config(type(config), "", ["--config", str(path)]) == config


def test_flags_override_the_file_and_toml_works_too(tmp_path):
    saved = tmp_path / "train_config.json"
    save_config(TrainConfig(lr=3e-4, max_steps=7, seed=5), saved)
    config = parse_config(TrainConfig, "", ["--config", str(saved), "--lr", "1e-3", "--seed", "9"])
    assert (config.lr, config.seed, config.max_steps) == (1e-3, 9, 7)

    toml = tmp_path / "lora.toml"
    toml.write_text('rank = 4\ntarget_modules = ["attention+mlp"]\nlr = 2e-3\n')
    config = parse_config(LoraTrainConfig, "", ["--config", str(toml), "--rank", "8"])
    assert (config.rank, config.target_modules, config.lr) == (8, ["attention+mlp"], 2e-3)


def test_a_saved_config_never_resumes_or_overwrites_unasked(tmp_path, capsys):
    saved = tmp_path / "train_config.json"
    save_config(TrainConfig(resume=True, overwrite=True), saved)
    config = parse_config(TrainConfig, "", ["--config", str(saved)])
    assert not config.resume and not config.overwrite
    assert "never carries over; pass --resume" in capsys.readouterr().out
    assert parse_config(TrainConfig, "", ["--config", str(saved), "--resume"]).resume


@pytest.mark.parametrize(
    "text, suffix, sentence",
    [
        ('{"lrr": 1e-4}', ".json", "has unknown setting(s) ['lrr'] (did you mean ['lr']?)"),
        (
            'lr = "1e-4"',
            ".toml",
            'sets lr = "1e-4", a string, but lr takes a number; write lr as a number, without quotes.',
        ),
        ('precision = "fp8"', ".toml", 'sets precision = "fp8"; use one of'),
        ('{"lr": ', ".json", "is not valid JSON"),
        ("[1, 2]", ".json", "holds a list, not a table of settings"),
        ("lr = 1e-4", ".yaml", "is neither a .json nor a .toml file"),
    ],
)
def test_a_bad_config_file_is_one_sentence(tmp_path, text, suffix, sentence):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        parse_config(TrainConfig, "", ["--config", str(path)])
    assert sentence in str(raised.value) and str(path) in str(raised.value)
    with pytest.raises(UserError, match="is not a file"):
        parse_config(TrainConfig, "", ["--config", str(tmp_path / "missing.json")])


def test_a_config_file_given_to_the_script_runs_as_its_flags_would(tmp_path):
    """Through the command line: a saved prepare_config.json with one flag changed, as a user relaunches a stage."""
    saved = tmp_path / "prepare_config.json"
    save_config(PrepareConfig(seq_len=64), saved)
    result = subprocess.run(
        [sys.executable, "data/prepare_oasst.py", "--config", str(saved), "--seq-len", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: --seq-len"), result.stderr


def test_set_changes_the_study_as_its_file_would(tmp_path):
    study = load_study(
        QUICK,
        seeds=None,
        overrides=[
            "budget.max_steps=9",
            "runs.full_ft.lr=1e-4",
            "runs.lora_r8.rank=16",
            "data.dev_fraction=0.2",
            "runs.lora_r8.lr=[1e-3, 3e-3]",
        ],
    )
    runs = {spec.name: spec for spec in study.runs}
    assert runs["full_ft"].learning_rates == [1e-4] and runs["full_ft"].config.max_steps == 9
    assert runs["lora_r8"].config.rank == 16 and runs["lora_r8"].learning_rates == [1e-3, 3e-3]
    assert study.prepare.dev_fraction == 0.2 and study.overrides[0] == "budget.max_steps=9"
    plain = load_study(QUICK)
    assert plain.overrides == [] and {spec.name: spec for spec in plain.runs}["lora_r8"].config.rank == 8


@pytest.mark.parametrize(
    "override, sentence",
    [
        ("budget.lr", "is not TABLE.KEY=VALUE"),
        ("budgett.lr=1e-4", "names no setting of a study file"),
        ("runs.nosuch.rank=4", "names no run of"),
        ("budget.lrr=1e-4", "has unknown setting(s) ['lrr']"),
        ("runs.lora_r8.rank=big", 'sets rank = "big", a string, but rank takes a whole number'),
    ],
)
def test_a_bad_set_is_one_sentence_naming_it(override, sentence):
    with pytest.raises(UserError) as raised:
        load_study(QUICK, overrides=[override])
    assert sentence in str(raised.value)
    if "unknown" in sentence or "takes" in sentence:
        assert f"with --set {override}" in str(raised.value)


def test_set_is_recorded_in_results_and_a_changed_set_redoes_what_it_changes(tmp_path):
    study_file = one_run_study(tmp_path / "study.toml", steps=2)
    output = tmp_path / "out"
    from studykit.study import run_study

    run_study(StudyConfig(config=str(study_file), output_dir=str(output)))
    changed = StudyConfig(config=str(study_file), output_dir=str(output), overrides=["budget.max_steps=3"])
    done = run_study(changed)
    assert done["trained"] == [ONE_RUN_TRAINING] and done["reported"]
    results = json.loads((output / "results" / "results.json").read_text())
    assert results["study_overrides"] == ["budget.max_steps=3"]
    assert json.loads((output / "checkpoints" / ONE_RUN_TRAINING / "run.json").read_text())["steps"] == 3


def test_the_set_flag_repeats_on_the_command_line():
    config = parse_config(
        StudyConfig, "", ["--preset", "quick", "--set", "budget.lr=1e-4", "--set", "runs.lora_r8.rank=16"]
    )
    assert config.overrides == ["budget.lr=1e-4", "runs.lora_r8.rank=16"]
    assert config_to_dict(parse_config(StudyConfig, "", []))["overrides"] == []


@pytest.mark.skipif(
    shutil.which("studykit-train-lora", path=str(Path(sys.executable).parent)) is None,
    reason="the kit is not installed in this Python (pip install -e .)",
)
def test_the_entry_points_are_the_scripts():
    bin_dir = Path(sys.executable).parent
    pairs = {
        "studykit-prepare": "data/prepare_oasst.py",
        "studykit-train-full": "training/train_full_ft.py",
        "studykit-train-lora": "training/train_lora.py",
        "studykit-eval": "evaluation/perplexity.py",
        "studykit-study": "run_study.py",
        "studykit-analyze": "evaluation/analyze.py",
    }
    for entry, script in pairs.items():
        by_entry = subprocess.run([str(bin_dir / entry), "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
        by_script = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
        assert by_entry.returncode == by_script.returncode == 0, by_entry.stderr
        # The usage line names the program (and wraps by its length); the description and every option are the same.
        assert by_entry.stdout.split("\n\n", 1)[1] == by_script.stdout.split("\n\n", 1)[1], entry
        # studykit-study's --config is the study file; studykit-analyze reads the study's directory.
        assert "--config FILE" in by_entry.stdout or entry in ("studykit-study", "studykit-analyze")


@pytest.mark.parametrize("config_cls", [TrainConfig, LoraTrainConfig])
def test_training_help_prints_every_flag_in_a_named_section(config_cls):
    sections = help_sections(config_cls)
    assert list(sections) == [
        "data",
        "model and method",
        "optimizer and schedule",
        "memory and speed",
        "validation, logging and trackers",
        "checkpoints",
        "Hub",
    ], f"fields without a section: {sections.get('other settings')}; add them to {config_cls.__name__}.HELP_SECTIONS"
    listed = [name for names in sections.values() for name in names]
    assert sorted(listed) == sorted(field.name for field in dataclasses.fields(config_cls))
    text = build_parser(config_cls, "").format_help()
    optimizer_part = text[text.index("\noptimizer and schedule:\n") : text.index("\nmemory and speed:\n")]
    assert "--lr LR" in optimizer_part and "--adam-beta2" in optimizer_part and "--precision" not in optimizer_part
    if config_cls is LoraTrainConfig:
        method_part = text[text.index("\nmodel and method:\n") : text.index("\noptimizer and schedule:\n")]
        assert "--rank RANK" in method_part and "--target-modules" in method_part


def test_a_field_left_out_of_the_sections_still_has_its_flag():
    @dataclasses.dataclass
    class Sectioned:
        HELP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"first": ("a",)}
        a: int = option(1, "listed")
        b: int = option(2, "not listed")

    assert help_sections(Sectioned) == {"first": ["a"], "other settings": ["b"]}
    assert parse_config(Sectioned, "", ["--b", "3"]).b == 3
