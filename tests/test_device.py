"""Which device trains: a model too big for a CPU stops with its estimated time unless --device cpu says that is
meant; --device cuda without a GPU is one sentence."""

import pytest
import torch
from conftest import FULL, one_run_study, refused, train_in_process

from studykit import runtime

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these are the CPU-only machine's refusals")


def train_args(inputs, output_dir, *extra):
    return [
        "--model",
        inputs["model"],
        "--data-dir",
        inputs["data"],
        "--output-dir",
        output_dir,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        *extra,
    ]


def test_a_big_model_on_a_cpu_states_its_time_and_needs_device_cpu(
    in_process, monkeypatch, tmp_path, small_vocab_inputs
):
    # The tiny model's two steps stand in for a long training: the bar is lowered below their time.
    monkeypatch.setattr(runtime, "CPU_GUARD_SECONDS", 0)
    message = refused(FULL, *train_args(small_vocab_inputs, tmp_path / "run"), watch=[tmp_path], runner=in_process)
    assert message.startswith(
        f"error: no GPU is visible to torch {torch.__version__}: training {small_vocab_inputs['model']} for 2 steps"
    )
    assert "on this CPU would take about" in message and "pass --device cpu to train on the CPU anyway" in message
    record = train_in_process("full", small_vocab_inputs, tmp_path / "meant", max_steps=2, device="cpu")
    assert record["device"] == "cpu" and record["config"]["device"] == "cpu"


def test_device_cuda_without_a_gpu_is_one_sentence(in_process, tmp_path, small_vocab_inputs):
    message = refused(
        FULL, *train_args(small_vocab_inputs, tmp_path / "run", "--device", "cuda"), watch=[tmp_path], runner=in_process
    )
    assert "--device cuda, but this torch" in message and "sees no CUDA GPU" in message


def test_a_study_of_a_big_model_on_a_cpu_stops_before_it_trains(monkeypatch, tmp_path):
    from studykit.config import StudyConfig
    from studykit.errors import UserError
    from studykit.study import run_study

    monkeypatch.setattr(runtime, "CPU_GUARD_SECONDS", 0)
    config = StudyConfig(config=str(one_run_study(tmp_path / "study.toml", steps=2)), output_dir=str(tmp_path / "out"))
    with pytest.raises(
        UserError, match=r"no GPU is visible .*: the study's pending trainings of .* would take about .*--device cpu"
    ):
        run_study(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_cpu_refusal_goes_by_the_time_it_states(monkeypatch):
    """One step of a 124M-parameter model on a CPU runs; a small model's long training is refused, saying the time."""
    from studykit.errors import UserError

    monkeypatch.setattr(runtime, "cpu_matmul_tflops", lambda: 1.0)  # a CPU of 1 TFLOP/s
    gpt2_small, tokens_per_step = 124_000_000, 8 * 4 * 512
    runtime.refuse_slow_cpu_run("auto", "one step", lambda: (gpt2_small, 6 * gpt2_small * tokens_per_step))
    small, steps = 5_000_000, 100_000
    with pytest.raises(UserError, match=r"5\.0M parameters\) on this CPU would take about 14 h .* over the 30 min"):
        runtime.refuse_slow_cpu_run("auto", "a long one", lambda: (small, 6 * small * tokens_per_step * steps))
    runtime.refuse_slow_cpu_run("cpu", "a long one, meant", lambda: (small, 6 * small * tokens_per_step * steps))
