"""Resume and crash safety: a resumed run ends where an uninterrupted one does; Ctrl-C, SIGTERM and SIGKILL
leave a checkpoint that resumes; writes are atomic; the same seed gives the same losses."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, train_in_process
from safetensors.torch import load_file

from studykit import checkpointing, safeguards
from studykit.io import PARTIAL_MARKER, atomic_directory, find_partial_directories
from studykit.run_dir import (
    RUN_LOG,
    RUN_RECORD,
    RunLog,
    read_run_log,
    resumable_checkpoints,
)

WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


def logged(run_dir):
    return read_run_log(Path(run_dir) / RUN_LOG)


def checkpoint_names(run_dir):
    return [path.name for path in resumable_checkpoints(run_dir)]


# adamw8bit: bitsandbytes' quantised moments and their block scales go through the checkpoint as plain tensors.
@pytest.mark.parametrize("method, optimizer", [("full", "adamw"), ("lora", "adamw"), ("full", "adamw8bit")])
def test_resumed_run_ends_with_the_weights_and_losses_of_an_uninterrupted_one(
    method, optimizer, small_vocab_inputs, tmp_path, monkeypatch
):
    straight = tmp_path / "straight"
    train_in_process(method, small_vocab_inputs, straight, save_every=1, keep=2, optimizer=optimizer)
    # The last --keep checkpoints stay; the final step is saved as the finished run, not as a resumable checkpoint.
    assert checkpoint_names(straight) == ["step-000004", "step-000005"]

    # Ctrl-C arrives while step 3 is being logged: the step finishes, a checkpoint is saved, the run stops.
    interrupted = tmp_path / "interrupted"
    write = RunLog.write

    def write_then_interrupt(self, entry):
        write(self, entry)
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLog, "write", write_then_interrupt)
    with pytest.raises(safeguards.Interrupted) as stopped:
        train_in_process(method, small_vocab_inputs, interrupted, save_every=2, optimizer=optimizer)
    monkeypatch.undo()
    assert (
        stopped.value.exit_code == 130
        and "SIGINT after step 3" in str(stopped.value)
        and "--resume" in str(stopped.value)
    )
    assert checkpoint_names(interrupted) == ["step-000002", "step-000003"]
    assert not (interrupted / RUN_RECORD).exists()
    # A newer directory left by a crashed write is never loaded (it would skip steps 4 and 5).
    shutil.copytree(
        interrupted / "resume" / "step-000003", interrupted / "resume" / f"step-000005{PARTIAL_MARKER}99999"
    )

    record = train_in_process(method, small_vocab_inputs, interrupted, save_every=2, resume=True, optimizer=optimizer)

    expected, resumed = logged(straight), logged(interrupted)
    assert [entry["step"] for entry in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("train_loss", "dev_loss", "lr", "tokens_seen"):
        assert [entry[key] for entry in resumed if key in entry] == pytest.approx(
            [entry[key] for entry in expected if key in entry], rel=1e-6
        ), key
    assert [entry["step"] for entry in resumed if "dev_loss" in entry] == [3, 6]
    straight_weights, resumed_weights = load_file(straight / WEIGHTS[method]), load_file(interrupted / WEIGHTS[method])
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    initial = load_file(small_vocab_inputs["model"] / "model.safetensors")
    if method == "full":
        assert not torch.allclose(
            initial["transformer.h.0.attn.c_attn.weight"], resumed_weights["transformer.h.0.attn.c_attn.weight"]
        )
    assert record["steps"] == 6 and record["skipped_steps"] == 0 and record["optimizer"] == optimizer


def test_same_seed_and_settings_give_identical_losses(small_vocab_inputs, tmp_path):
    first = train_in_process("full", small_vocab_inputs, tmp_path / "first", max_steps=4)
    second = train_in_process("full", small_vocab_inputs, tmp_path / "second", max_steps=4)
    other_seed = train_in_process("full", small_vocab_inputs, tmp_path / "other", max_steps=4, seed=7)
    losses = [entry["train_loss"] for entry in logged(tmp_path / "first")]
    assert losses == [entry["train_loss"] for entry in logged(tmp_path / "second")]
    assert losses != [entry["train_loss"] for entry in logged(tmp_path / "other")]
    assert first["final_dev_loss"] == second["final_dev_loss"]
    assert other_seed["final_dev_loss"] != first["final_dev_loss"]
    first_weights, second_weights = (
        load_file(tmp_path / "first" / WEIGHTS["full"]),
        load_file(tmp_path / "second" / WEIGHTS["full"]),
    )
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)


def train_command(inputs, output_dir, *extra):
    return [
        sys.executable,
        str(REPO_ROOT / "training" / "train_full_ft.py"),
        "--model",
        str(inputs["model"]),
        "--data-dir",
        str(inputs["data"]),
        "--output-dir",
        str(output_dir),
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--lr",
        "1e-3",
        *extra,
    ]


def start_and_wait_for_steps(command, log_path, steps, timeout=120):
    """Start a training command and return once it has logged `steps` steps (so it is inside the training loop)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    while len(read_run_log(log_path)) < steps:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"training ended or hung before step {steps}: {process.communicate()[1][-3000:]}")
        time.sleep(0.005)
    return process


def error_line(stderr):
    """The one `error:` line; progress bars may precede it on stderr, a traceback never."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_saves_a_checkpoint_that_resumes(signal_number, small_vocab_inputs, tmp_path):
    output_dir = tmp_path / "run"
    command = train_command(small_vocab_inputs, output_dir, "--max-steps", "2000")
    process = start_and_wait_for_steps(command, output_dir / RUN_LOG, steps=2)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    name = signal.Signals(signal_number).name
    assert process.returncode == 128 + signal_number
    line = error_line(stderr)
    assert (
        line.startswith(f"error: training stopped by {name} after step ")
        and "run the same command with --resume" in line
    )
    stopped_at = int(line.split("after step ")[1].split(";")[0])
    assert checkpoint_names(output_dir) == [f"step-{stopped_at:06d}"]
    assert [entry["step"] for entry in logged(output_dir)] == list(range(1, stopped_at + 1))
    state = checkpointing.read_json(output_dir / "resume" / f"step-{stopped_at:06d}" / "trainer_state.json")
    assert state["step"] == stopped_at and not (output_dir / RUN_RECORD).exists()


def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes(small_vocab_inputs, tmp_path):
    """Killed right after a step is logged, i.e. while its checkpoint is being written (save_every 1)."""
    output_dir = tmp_path / "run"
    command = train_command(small_vocab_inputs, output_dir, "--max-steps", "12", "--save-every", "1", "--keep", "1")
    process = start_and_wait_for_steps(command, output_dir / RUN_LOG, steps=3)
    process.kill()
    process.communicate()
    checkpoints = resumable_checkpoints(output_dir)
    assert checkpoints, "no complete checkpoint survived"
    latest = checkpoints[-1]
    assert all((latest / name).exists() for name in (*checkpointing.CHECKPOINT_STATE_FILES, "model.safetensors"))
    load_file(latest / "model.safetensors")

    # The resumed command, in this process to save an interpreter start: same settings as `command`.
    settings = dict(max_steps=12, grad_accum=1, eval_every=0, save_every=1, keep=1)
    record = train_in_process("full", small_vocab_inputs, output_dir, resume=True, **settings)
    assert record["steps"] == 12
    assert [entry["step"] for entry in logged(output_dir)] == list(range(1, 13))
    assert checkpoint_names(output_dir) == ["step-000011"]
    straight = train_in_process("full", small_vocab_inputs, tmp_path / "straight", **settings)
    assert record["final_dev_loss"] == pytest.approx(straight["final_dev_loss"], rel=1e-6)
    assert [entry["train_loss"] for entry in logged(output_dir)] == pytest.approx(
        [entry["train_loss"] for entry in logged(tmp_path / "straight")], rel=1e-6
    )


WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from studykit.io import atomic_directory
with atomic_directory(Path({target!r})) as staging:
    (staging / "weights.bin").write_bytes(b"new" * 1000)
    print("written", flush=True)
    time.sleep({pause})
"""


def test_atomic_directory_killed_mid_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(root=str(REPO_ROOT), target=str(target), pause=60)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "written"
    writer.kill()
    writer.communicate()
    assert (
        sorted(p.name for p in target.iterdir()) == ["weights.bin"] and (target / "weights.bin").read_bytes() == b"old"
    )
    leftovers = find_partial_directories(tmp_path)
    assert len(leftovers) == 1 and (leftovers[0] / "weights.bin").exists()

    subprocess.run(
        [sys.executable, "-c", WRITER.format(root=str(REPO_ROOT), target=str(target), pause=0)],
        check=True,
        capture_output=True,
    )
    assert (target / "weights.bin").read_bytes() == b"new" * 1000
    assert find_partial_directories(tmp_path) == leftovers, "a finished write leaves nothing of its own behind"


def test_atomic_directory_discards_the_new_version_when_the_writer_fails(tmp_path):
    target = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "part").write_text("half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_a_log_line_torn_by_a_crash_is_dropped_on_resume(tmp_path):
    path = tmp_path / RUN_LOG
    path.write_text('{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_loss": 2.4}\n{"step": 3, "train_lo')
    log = RunLog(path, enabled=True, keep_until_step=2)
    log.write({"step": 3, "train_loss": 2.3})
    assert read_run_log(path) == [
        {"step": 1, "train_loss": 2.5},
        {"step": 2, "train_loss": 2.4},
        {"step": 3, "train_loss": 2.3},
    ]
    assert find_partial_directories(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [RUN_LOG]
