"""Ordinary accidents: two commands on one output directory, a full disk, damaged files.

Each gets one sentence, a non-zero exit and no lost work: the refused command changes no file, and the last complete
checkpoint (or dataset, or results) stays loadable. The full disk is real where the tests may mount a small tmpfs
(as root), and injected at the write (ENOSPC from the writer) everywhere.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    EVALUATE,
    FULL,
    PREPARE,
    QUIET,
    REPO_ROOT,
    refused,
    snapshot,
    train_in_process,
)
from safetensors.torch import load_file

from studykit import checkpointing, locks
from studykit.io import PARTIAL_MARKER
from studykit.run_dir import read_run_log


def prepare_args(data_file, tokenizer, output_dir, *extra):
    return [
        "--data-file",
        data_file,
        "--tokenizer",
        tokenizer,
        "--output-dir",
        output_dir,
        "--seq-len",
        "64",
        "--test-fraction",
        "0.2",
        *extra,
    ]


def train_args(inputs, output_dir, *extra):
    return [
        "--model",
        inputs["model"],
        "--data-dir",
        inputs["data"],
        "--output-dir",
        output_dir,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        *extra,
    ]


def eval_args(inputs, checkpoints, output_dir):
    return [
        "--model",
        inputs["model"],
        "--data-dir",
        inputs["data"],
        "--checkpoints",
        checkpoints,
        "--output-dir",
        output_dir,
    ]


# ---------------------------------------------------------------------------------------------------------
# Two commands at once
# ---------------------------------------------------------------------------------------------------------

HOLD_LOCK = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from studykit import locks
with locks.exclusive(pathlib.Path(sys.argv[2]), "--output-dir"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lock_holder():
    """Another process that holds a stage's lock on a directory, as a running command would."""
    processes = []

    def hold(directory):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(REPO_ROOT), str(directory)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "locked"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_prepare_on_a_busy_directory_is_refused_and_a_dead_holders_lock_is_taken_over(
    in_process, lock_holder, tmp_path, oasst_trees_file, gpt2_tokenizer_dir
):
    output = tmp_path / "data"
    holder = lock_holder(output)
    message = refused(
        PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output), watch=[tmp_path], runner=in_process
    )
    assert (
        f"process {holder.pid} (`-c " in message
        and f"is writing to {output}" in message
        and "another --output-dir" in message
    )

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = in_process(PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"taking over the lock on {output} from process {holder.pid}" in result.stdout
    assert not (output / locks.LOCK_FILE).exists(), "the lock outlived the command"


@pytest.mark.parametrize("stage", ["evaluate", "study"])
def test_evaluation_and_the_study_runner_refuse_a_busy_directory(
    stage, in_process, lock_holder, tmp_path, small_vocab_inputs
):
    if stage == "evaluate":
        (tmp_path / "checkpoints").mkdir()
        output = tmp_path / "results"
        script, args = EVALUATE, eval_args(small_vocab_inputs, tmp_path / "checkpoints", output)
    else:
        output = tmp_path / "study"
        script, args = "run_study.py", ["--preset", "quick", "--output-dir", output]
    holder = lock_holder(output)
    message = refused(script, *args, watch=[tmp_path], runner=in_process)
    assert f"process {holder.pid}" in message and f"is writing to {output}" in message


def test_two_trainings_on_one_output_directory(in_process, tmp_path, small_vocab_inputs):
    """The real case: a second training started while the first runs is refused at once, naming the first; once the
    first is killed (kill -9 leaves its lock file behind), its lock is taken over."""
    output = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / FULL),
            *map(str, train_args(small_vocab_inputs, output, "--max-steps", "100000")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        owner = output / (locks.LOCK_FILE + locks.OWNER_SUFFIX)
        deadline = time.monotonic() + 240
        while not owner.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first training never took its lock"
            time.sleep(0.2)
        message = refused(
            FULL,
            *train_args(small_vocab_inputs, output, "--max-steps", "2", "--overwrite"),
            watch=[],
            runner=in_process,
        )
        assert f"process {first.pid} (`train_full_ft.py " in message and f"is writing to {output}" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert owner.exists(), "kill -9 leaves the owner note behind; the next command must cope with it"
    result = in_process(FULL, *train_args(small_vocab_inputs, output, "--max-steps", "2", "--overwrite"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"taking over the lock on {output} from process {first.pid}" in result.stdout
    assert json.loads((output / "run.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB filesystem (tmpfs) on which the tests run out of space for real; skipped where mounting is not
    allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(disk, leave_bytes):
    """Take all but `leave_bytes` of the disk's free space with one file; deleting it frees the space again."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as stream:
        stream.truncate(0)
        stream.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_a_full_disk_stops_training_with_the_last_checkpoint_intact_and_resume_finishes(
    in_process, small_disk, small_vocab_inputs, tmp_path
):
    """The step-2 checkpoint fits, the step-4 one does not: the run stops naming the disk, what the save needs and the
    checkpoint it can resume from; once space is freed, --resume ends with the weights of an uninterrupted run."""
    reference = train_in_process("full", small_vocab_inputs, tmp_path / "reference", max_steps=6, save_every=2)
    checkpoint_size = sum(
        p.stat().st_size for p in (tmp_path / "reference" / "resume" / "step-000004").rglob("*") if p.is_file()
    )
    output = small_disk / "run"
    args = train_args(small_vocab_inputs, output, "--max-steps", "6", "--save-every", "2", "--eval-every", "3")
    filler = fill_disk(small_disk, int(1.6 * checkpoint_size))
    line = last_error_line(in_process(FULL, *args, env=QUIET))
    assert line.startswith(
        f"error: the disk holding {output} is full: writing the resumable checkpoint of step 4 needs about "
    ), line
    assert " is free; free some space, then run the same command with --resume to continue from" in line, line
    assert line.endswith(f"{output / 'resume' / 'step-000002'}, which is intact."), line
    assert [p.name for p in (output / "resume").iterdir()] == ["step-000002"], (
        "a half-written checkpoint was left behind"
    )

    filler.unlink()
    resumed = in_process(FULL, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(output / "model.safetensors")
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert json.loads((output / "run.json").read_text())["final_train_loss"] == reference["final_train_loss"]


def test_running_out_of_space_in_the_middle_of_a_write(in_process, monkeypatch, small_disk, small_vocab_inputs):
    """With the size estimate switched off, the save starts and the filesystem itself refuses the bytes (safetensors'
    "os error 28"): the same sentence, and no half-written checkpoint."""
    monkeypatch.setattr(checkpointing, "weight_bytes", lambda model: 0)
    monkeypatch.setattr(checkpointing, "tensor_bytes", lambda state: 0)
    monkeypatch.setattr(checkpointing, "SAVE_OVERHEAD_BYTES", 0)
    output = small_disk / "run"
    fill_disk(small_disk, 200_000)
    line = last_error_line(
        in_process(FULL, *train_args(small_vocab_inputs, output, "--max-steps", "4", "--save-every", "2"), env=QUIET)
    )
    assert line.startswith(
        f"error: the disk holding {output} is full: writing the resumable checkpoint of step 2 needs about"
    ), line
    assert "--overwrite to train again (no resumable checkpoint was saved" in line
    assert not list((output / "resume").glob(f"*{PARTIAL_MARKER}*")) if (output / "resume").exists() else True


def last_error_line(result):
    """The command's error, after any progress it drew: one `error:` line, last, and no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr[-3000:]
    return line


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_final_save_keeps_the_resumable_checkpoint(
    in_process, monkeypatch, small_vocab_inputs, tmp_path
):
    """Injected at the writer (safetensors, as transformers and peft call it), so it runs on any machine."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    output = tmp_path / "run"
    args = train_args(small_vocab_inputs, output, "--max-steps", "4", "--save-every", "2")
    calls = {"count": 0}
    original = modeling_utils.safe_save_file

    def full_after_the_first_checkpoint(*a, **k):
        calls["count"] += 1
        return original(*a, **k) if calls["count"] == 1 else full()

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_after_the_first_checkpoint)
    line = last_error_line(in_process(FULL, *args, env=QUIET))
    assert line.startswith(f"error: the disk holding {output} is full: writing the final checkpoint needs about "), line
    assert not (output / "run.json").exists() and not (output / "model.safetensors").exists()
    assert [p.name for p in (output / "resume").iterdir()] == ["step-000002"]

    monkeypatch.setattr(modeling_utils, "safe_save_file", original)
    resumed = in_process(FULL, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((output / "run.json").read_text())["steps"] == 4


def test_a_full_disk_during_prepare_leaves_the_earlier_dataset(
    in_process, monkeypatch, tmp_path, oasst_trees_file, gpt2_tokenizer_dir
):
    import datasets

    output = tmp_path / "data"
    assert in_process(PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output)).returncode == 0
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", enospc)
    message = refused(
        PREPARE,
        *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output, "--seq-len", "32", "--overwrite"),
        watch=[tmp_path],
        runner=in_process,
    )
    assert message.startswith(f"error: the disk holding {tmp_path} is full: writing the processed dataset needs about ")
    assert message.endswith(
        "free some space and run the same command again (an earlier dataset in --output-dir is untouched)"
    )


def test_a_full_disk_during_evaluation_leaves_the_earlier_results(
    in_process, monkeypatch, tmp_path, small_vocab_inputs
):
    import numpy as np

    checkpoints = tmp_path / "checkpoints"
    train_in_process("lora", small_vocab_inputs, checkpoints / "lora", max_steps=2)
    args = eval_args(small_vocab_inputs, checkpoints, tmp_path / "results")
    assert in_process(EVALUATE, *args).returncode == 0
    monkeypatch.setattr(np, "savez", enospc)
    before = snapshot(tmp_path / "results")
    message = last_error_line(in_process(EVALUATE, *args, env=QUIET))
    assert snapshot(tmp_path / "results") == before
    assert message.startswith(
        f"error: the disk holding {tmp_path / 'results'} is full: writing the evaluation results needs about"
    )


def test_a_full_disk_during_evaluation_on_a_real_small_disk(in_process, small_disk, tmp_path, small_vocab_inputs):
    checkpoints = tmp_path / "checkpoints"
    train_in_process("lora", small_vocab_inputs, checkpoints / "lora", max_steps=2)
    fill_disk(small_disk, 100_000)
    message = refused(
        EVALUATE,
        *eval_args(small_vocab_inputs, checkpoints, small_disk / "results"),
        watch=[small_disk / "results"],
        runner=in_process,
    )
    assert f"the disk holding {small_disk / 'results'} is full" in message


def test_a_full_disk_while_writing_the_report_keeps_the_trained_runs(tmp_path, monkeypatch):
    """Injected at the figure writer: the study stops with the sentence; the next run, with space, only reports."""
    from conftest import ONE_RUN_TRAINING, one_run_study

    from studykit import figures
    from studykit.errors import UserError
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    study_file = one_run_study(tmp_path / "study.toml", steps=2)
    output = tmp_path / "out"
    monkeypatch.setattr(figures, "plot_loss_curves", enospc)
    with pytest.raises(
        UserError,
        match=r"the disk holding .*results is full: writing the report \(results, figures, samples\) needs "
        r"about .* free some space and run the same study command again \(the trained runs are kept\)",
    ):
        run_study(StudyConfig(config=str(study_file), output_dir=str(output)))
    monkeypatch.undo()
    again = run_study(StudyConfig(config=str(study_file), output_dir=str(output)))
    assert again["trained"] == [] and again["kept"] == [ONE_RUN_TRAINING] and again["reported"]


# ---------------------------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------------------------


def cut_short(path):
    """What an interrupted copy or a failing disk leaves: the first half of the file."""
    size = path.stat().st_size
    with open(path, "r+b") as stream:
        stream.truncate(size // 2)


@pytest.fixture
def copied_inputs(tmp_path, small_vocab_inputs):
    """The small model and its data, copied so that a test may damage them."""
    return {
        "model": shutil.copytree(small_vocab_inputs["model"], tmp_path / "model"),
        "data": shutil.copytree(small_vocab_inputs["data"], tmp_path / "data"),
    }


def change_one_token(data_dir):
    """Different bytes that Arrow reads without complaint: one token id of the training split moved by one."""
    import datasets

    dataset = datasets.load_from_disk(str(data_dir))
    train = dataset["train"].map(
        lambda row, index: {"input_ids": [row["input_ids"][0] + (index == 0), *row["input_ids"][1:]]}, with_indices=True
    )
    staged = data_dir.with_name("staged")
    datasets.DatasetDict({"train": train, "dev": dataset["dev"], "test": dataset["test"]}).save_to_disk(str(staged))
    for split in ("train", "dev", "test"):
        shutil.rmtree(data_dir / split)
        shutil.move(staged / split, data_dir / split)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("arrow cut short", "is damaged ("),
        ("a token changed", "/train is damaged (its train sequences no longer match the fingerprint in meta.json)"),
        ("meta.json garbled", "meta.json is damaged (not valid JSON"),
    ],
)
def test_a_damaged_processed_dataset_is_named_by_training_and_evaluation(
    damage, expected, in_process, copied_inputs, tmp_path
):
    data = copied_inputs["data"]
    if damage == "arrow cut short":
        cut_short(next((data / "train").glob("*.arrow")))
    elif damage == "a token changed":
        change_one_token(data)
    else:
        (data / "meta.json").write_text('{"seq_len": 64, "fingerp')
    message = refused(
        FULL, *train_args(copied_inputs, tmp_path / "run", "--max-steps", "2"), watch=[tmp_path], runner=in_process
    )
    assert expected in message and "prepare it again with `python data/prepare_oasst.py --output-dir" in message, (
        message
    )
    (tmp_path / "checkpoints").mkdir()
    message = refused(
        EVALUATE,
        *eval_args(copied_inputs, tmp_path / "checkpoints", tmp_path / "results"),
        watch=[tmp_path],
        runner=in_process,
    )
    assert expected in message and "--overwrite" in message, message


@pytest.mark.parametrize(
    "file, expected",
    [
        ("model.safetensors", "is damaged (the model fails to load: Error while deserializing header"),
        ("tokenizer.json", "is damaged (its tokenizer fails to load"),
        ("config.json", "is damaged (its tokenizer fails to load: It looks like the config file"),
    ],
)
def test_a_damaged_base_model_is_named(file, expected, in_process, copied_inputs, tmp_path):
    cut_short(copied_inputs["model"] / file)
    message = refused(
        FULL, *train_args(copied_inputs, tmp_path / "run", "--max-steps", "2"), watch=[tmp_path], runner=in_process
    )
    assert f"{copied_inputs['model']} {expected}" in message and "save it again with save_pretrained" in message, (
        message
    )


@pytest.mark.parametrize(
    "file, expected",
    [
        ("adapter_model.safetensors", "adapter_model.safetensors is damaged (Error while deserializing header"),
        ("adapter_config.json", "adapter_config.json is damaged (not valid JSON"),
        ("run.json", "run.json is damaged (not valid JSON"),
    ],
)
def test_a_damaged_finished_run_is_named_by_evaluation(file, expected, in_process, small_vocab_inputs, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    train_in_process("lora", small_vocab_inputs, checkpoints / "lora", max_steps=2)
    cut_short(checkpoints / "lora" / file)
    message = refused(
        EVALUATE, *eval_args(small_vocab_inputs, checkpoints, tmp_path / "results"), watch=[tmp_path], runner=in_process
    )
    assert expected in message and "train that run again" in message, message


@pytest.mark.parametrize(
    "file", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "run_identity.json"]
)
def test_a_damaged_resumable_checkpoint_is_named_and_the_one_before_resumes(
    file, in_process, small_vocab_inputs, tmp_path
):
    output = tmp_path / "run"
    args = train_args(small_vocab_inputs, output, "--max-steps", "6", "--save-every", "2", "--keep", "2")
    train_in_process(
        "full", small_vocab_inputs, output, max_steps=6, save_every=2, keep=2, batch_size=2, grad_accum=2, lr=1e-3
    )
    # What a machine lost after step 4's checkpoint leaves: no final weights, no run.json, two checkpoints.
    (output / "run.json").unlink()
    latest = output / "resume" / "step-000004"
    cut_short(latest / file)
    message = refused(FULL, *args, "--resume", watch=[tmp_path], runner=in_process)
    assert message == (f"error: the checkpoint {latest} has {file} damaged" + message.split(f"{file} damaged", 1)[1]), (
        message
    )
    assert message.endswith("; delete it to resume from the one before, or start again with --overwrite."), message

    shutil.rmtree(latest)
    resumed = in_process(FULL, *args, "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step-000002 at step 2" in resumed.stdout, (
        resumed.stderr[-2000:]
    )


def test_garbled_lines_of_the_training_log_are_dropped(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(
        b'{"step": 1, "train_loss": 2.0}\n\xff\xfe garbage\n[1, 2]\n{"no_step": 3}\n'
        b'{"step": 2, "train_loss": 1.5}\n{"step": 3, "tra'
    )
    assert [entry["step"] for entry in read_run_log(log)] == [1, 2]


def test_damaged_study_state_and_results_are_redone_not_trusted(tmp_path, capsys):
    """The study runner's own records and results: a damaged one means that step is done again, as after a crash."""
    from conftest import ONE_RUN_TRAINING, one_run_study

    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    config = StudyConfig(config=str(one_run_study(tmp_path / "study.toml", steps=2)), output_dir=str(tmp_path / "out"))
    output = tmp_path / "out"
    run_study(config)

    (output / "results" / "perplexity.json").write_text('[{"name": "ba')
    again = run_study(config)
    assert again["kept"] == [ONE_RUN_TRAINING] and again["evaluated"] and again["reported"]
    assert "perplexity.json is damaged" in capsys.readouterr().out

    cut_short(output / "results" / "per_response_nll.npz")
    assert run_study(config)["evaluated"]

    # The runner's own record of a training is rebuilt from the training's run.json, which says what produced it.
    (output / "checkpoints" / ONE_RUN_TRAINING / "study_inputs.json").write_text("{")
    again = run_study(config)
    assert again["trained"] == [] and again["kept"] == [ONE_RUN_TRAINING]
    assert json.loads((output / "checkpoints" / ONE_RUN_TRAINING / "study_inputs.json").read_text())["digest"]
    (output / "checkpoints" / ONE_RUN_TRAINING / "run.json").write_text('{"method": "fu')
    assert run_study(config)["trained"] == [ONE_RUN_TRAINING]

    (output / "processed" / "meta.json").write_text("{")
    again = run_study(config)
    assert again["prepared"] and again["trained"] == [], "the same data came out, so the run is kept"
