"""The comparison protocol: nothing that chooses reads the test split, a sweep picks the dev-best rate and flags a grid
edge, seeds replicate runs, trainings run where the hardware is (one per GPU, or as printed commands), and a printed
command runs as printed."""

import json
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ONE_RUN_TRAINING, QUIET, one_run_study, write_oasst_trees

from studykit import study_state
from studykit.config import LoraTrainConfig, TrainConfig, command_line, parse_config
from studykit.study import run_study
from studykit.study_config import StudyConfig
from studykit.study_file import load_study, lr_label
from studykit.study_launch import DeviceScheduler, visible_gpus


def invariance_study(path: Path, model: Path, data_file: Path) -> Path:
    """Full FT on the small model, a two-rate grid, one seed: everything a choice could read, and the test split."""
    path.write_text(f"""
[study]
name = "invariance"
[data]
data_file = "{data_file}"
seq_len = 64
test_fraction = 0.2
dev_fraction = 0.2
[budget]
model = "{model}"
seeds = [0]
max_steps = 4
batch_size = 2
grad_accum = 2
precision = "fp32"
eval_every = 2
log_every = 1
[eval]
batch_size = 8
[report]
bootstrap_resamples = 50
sample_prompts = 1
sample_new_tokens = 4
[[runs]]
name = "full_ft"
method = "full"
lr = [1e-3, 1e-2]
""")
    return path


def test_training_logs_and_every_choice_stay_the_same_when_the_test_split_changes(tmp_path, small_vocab_inputs):
    """Only evaluation reads the test split: rewrite every test response and the sweep, its logs and its choice are
    the same to the last digit, while the test perplexity moves."""
    original = write_oasst_trees(tmp_path / "original.jsonl")
    first = run_study(
        StudyConfig(
            config=str(invariance_study(tmp_path / "a.toml", small_vocab_inputs["model"], original)),
            output_dir=str(tmp_path / "a"),
        )
    )
    test_trees = set(json.loads((tmp_path / "a" / "processed" / "tree_split.json").read_text())["test"])
    changed = tmp_path / "changed.jsonl"
    lines = []
    for line in original.read_text().splitlines():
        tree = json.loads(line)
        if tree["message_tree_id"] in test_trees:
            for reply in tree["prompt"]["replies"]:
                reply["text"] = "Something else entirely: " + reply["text"][::-1]
        lines.append(json.dumps(tree))
    changed.write_text("\n".join(lines) + "\n")
    second = run_study(
        StudyConfig(
            config=str(invariance_study(tmp_path / "b.toml", small_vocab_inputs["model"], changed)),
            output_dir=str(tmp_path / "b"),
        )
    )

    assert first["chosen"] == second["chosen"] and sorted(first["trained"]) == sorted(second["trained"])
    for name in first["trained"]:
        logs = [
            [
                {key: value for key, value in json.loads(line).items() if key != "tokens_per_second"}
                for line in (tmp_path / root / "checkpoints" / name / "log.jsonl").read_text().splitlines()
            ]
            for root in ("a", "b")
        ]
        assert logs[0] == logs[1], name
    metas = [json.loads((tmp_path / root / "processed" / "meta.json").read_text()) for root in ("a", "b")]
    assert metas[0]["training_fingerprint"] == metas[1]["training_fingerprint"]
    assert metas[0]["test_fingerprint"] != metas[1]["test_fingerprint"]
    test_perplexities = [
        next(
            row
            for row in json.loads((tmp_path / root / "results" / "results.json").read_text())["rows"]
            if row["name"] == "full_ft"
        )["test"]["mean_perplexity"]
        for root in ("a", "b")
    ]
    assert test_perplexities[0] != test_perplexities[1]


def fake_records(monkeypatch, dev_losses: dict[float, float]):
    """Finished sweep trainings with the given final dev loss per rate."""
    monkeypatch.setattr(
        study_state,
        "finished_record",
        lambda training, fingerprint, adopt=True: SimpleNamespace(final_dev_loss=dev_losses[training.lr]),
    )


def three_rate_study(tmp_path) -> tuple:
    path = one_run_study(tmp_path / "study.toml")
    # No rate added beyond the grid (tests/test_grid_extension.py covers that): the choice within one fixed grid.
    path.write_text(
        path.read_text()
        .replace("lr = 1e-3", "lr = [1e-4, 1e-3, 1e-2]")
        .replace("grid_extensions = 2", "grid_extensions = 0")
    )
    study = load_study(path)
    return study, study.runs[0]


def test_the_sweep_picks_the_lowest_dev_loss_and_flags_only_a_choice_at_the_grid_edge(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path)
    fake_records(monkeypatch, {1e-4: 2.0, 1e-3: 1.5, 1e-2: 1.7})
    middle = study_state.sweep_result(study, spec, "fingerprint")
    assert middle.chosen_lr == 1e-3 and not middle.at_edge
    fake_records(monkeypatch, {1e-4: 2.0, 1e-3: 1.5, 1e-2: 1.2})
    edge = study_state.sweep_result(study, spec, "fingerprint")
    assert edge.chosen_lr == 1e-2 and edge.at_edge
    # A rate whose training diverged is never chosen; when all did, the sentence says to lower the grid.
    fake_records(monkeypatch, {1e-4: 2.0, 1e-3: float("nan"), 1e-2: float("inf")})
    assert study_state.sweep_result(study, spec, "fingerprint").chosen_lr == 1e-4
    fake_records(monkeypatch, {1e-4: float("nan"), 1e-3: float("nan"), 1e-2: float("nan")})
    with pytest.raises(Exception, match="non-finite dev loss; lower the grid"):
        study_state.sweep_result(study, spec, "fingerprint")


def test_the_sweep_chooses_nothing_while_a_sweep_training_is_missing(tmp_path, monkeypatch):
    study, spec = three_rate_study(tmp_path)
    monkeypatch.setattr(
        study_state,
        "finished_record",
        lambda training, fingerprint, adopt=True: None if training.lr == 1e-2 else SimpleNamespace(final_dev_loss=1.0),
    )
    result = study_state.sweep_result(study, spec, "fingerprint")
    assert result.chosen_lr is None and result.pending == [f"full_ft__lr{lr_label(1e-2)}__seed0"]


def test_seeds_replicate_the_chosen_rate_and_the_sweep_uses_the_sweep_seeds(tmp_path):
    path = one_run_study(tmp_path / "study.toml")
    path.write_text(
        path.read_text()
        .replace("lr = 1e-3", "lr = [1e-4, 1e-3]")
        .replace("seeds = [0]", "seeds = [0, 1, 2]\nsweep_seeds = [1]")
    )
    study = load_study(path)
    spec = study.runs[0]
    assert [t.name for t in study.sweep_trainings(spec)] == ["full_ft__lr1e-4__seed1", "full_ft__lr1e-3__seed1"]
    assert [(t.lr, t.seed, t.config.seed, t.config.lr) for t in study.replicate_trainings(spec, 1e-3)] == [
        (1e-3, seed, seed, 1e-3) for seed in (0, 1, 2)
    ]
    # --seeds replaces the study file's seeds; a sweep seed it drops falls back to the first of them.
    overridden = load_study(path, seeds=[7, 8])
    assert overridden.seeds == [7, 8] and overridden.sweep_seeds == [7]


class FakeProcess:
    """A training that runs for `polls` looks of the scheduler, then ends with `code`."""

    def __init__(self, polls: int, code: int = 0) -> None:
        self.polls, self.returncode = polls, None
        self.code = code

    def poll(self):
        self.polls -= 1
        if self.polls <= 0:
            self.returncode = self.code
        return self.returncode


def test_the_gpu_scheduler_runs_one_training_per_device_until_all_are_done(tmp_path):
    study, spec = three_rate_study(tmp_path)
    trainings = [study.training(spec, lr, seed) for lr in spec.learning_rates for seed in (0, 1)]
    running: dict[str, str] = {}
    overlaps = []

    def start(training, device):
        if device in running.values():
            overlaps.append(device)
        running[training.name] = device
        process = FakeProcess(polls=1 + len(running) % 3, code=1 if training.name == trainings[3].name else 0)
        original_poll = process.poll

        def poll():
            code = original_poll()
            if code is not None:
                running.pop(training.name, None)
            return code

        process.poll = poll
        return process

    scheduler = DeviceScheduler(["0", "1"], start, poll_seconds=0)
    failed = scheduler.run(trainings)
    assert not overlaps, "a device ran two trainings at once"
    assert sorted(name for name, _ in scheduler.assignments) == sorted(t.name for t in trainings)
    assert {device for _, device in scheduler.assignments} == {"0", "1"}
    assert [(training.name, code) for training, code in failed] == [(trainings[3].name, 1)]


def test_gpus_are_named_by_id_and_a_bad_list_is_one_sentence():
    assert visible_gpus("0,2") == ["0", "2"] and visible_gpus(None) == []
    with pytest.raises(Exception, match="--gpus takes CUDA device ids"):
        visible_gpus("first")


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(
            model="m", max_steps=7, lr=3e-4, seed=5, packing=True, max_gpu_memory_gb=6.0, group_by_length=False
        ),
        LoraTrainConfig(
            model="m",
            rank=4,
            lr=1e-3,
            target_modules=["attn.c_attn", "mlp.c_fc"],
            use_rslora=True,
            loraplus_lr_ratio=16.0,
        ),
    ],
    ids=["full", "lora"],
)
def test_a_config_written_as_a_command_line_parses_back_to_itself(config):
    assert parse_config(type(config), "", command_line(config)) == config


def test_printed_commands_run_as_printed_and_the_next_study_run_gathers_them(tmp_path, capsys):
    config = StudyConfig(
        config=str(one_run_study(tmp_path / "one.toml", steps=2)), output_dir=str(tmp_path / "out"), print_commands=True
    )
    printed = run_study(config)
    assert printed["pending"] == [ONE_RUN_TRAINING] and not printed["evaluated"]
    commands = [line for line in capsys.readouterr().out.splitlines() if line.endswith("--no-trust-remote-code")]
    assert len(commands) == 1 and "train_full_ft.py" in commands[0] and "--overwrite" in commands[0]
    # Run as a cluster job would: from another directory, with nothing but the printed line.
    subprocess.run(
        shlex.split(commands[0]),
        check=True,
        cwd=tmp_path,
        env={**__import__("os").environ, **QUIET, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    gathered = run_study(StudyConfig(config=config.config, output_dir=config.output_dir))
    assert (
        gathered["trained"] == []
        and gathered["kept"] == [ONE_RUN_TRAINING]
        and gathered["evaluated"]
        and gathered["reported"]
    )
