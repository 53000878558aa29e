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
    from studykit.errors import UserError
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    monkeypatch.setattr(runtime, "CPU_GUARD_SECONDS", 0)
    config = StudyConfig(config=str(one_run_study(tmp_path / "study.toml", steps=2)), output_dir=str(tmp_path / "out"))
    with pytest.raises(
        UserError, match=r"no GPU is visible .*: the study's pending trainings of .* would take about .*--device cpu"
    ):
        run_study(config)
    assert not (tmp_path / "out" / "checkpoints").exists()


# Apple GPUs (MPS): no Mac here, so the one probe every device choice asks (runtime.gpu_backend) stands in for one.


@pytest.fixture
def on_a_mac(monkeypatch):
    monkeypatch.setattr(runtime, "gpu_backend", lambda: "mps")


def test_auto_picks_the_apple_gpu_after_cuda_and_before_the_cpu(on_a_mac, monkeypatch):
    assert runtime.device_type_for("auto") == "mps" and runtime.device_type_for("mps") == "mps"
    assert runtime.default_device() == torch.device("mps")
    with pytest.raises(runtime.UserError, match=r"--device cuda, but .* sees no CUDA GPU; .* pass --device mps\.$"):
        runtime.device_type_for("cuda")
    assert runtime.device_type_for("cpu") == "cpu"
    monkeypatch.setattr(runtime, "gpu_backend", lambda: "cuda")
    assert runtime.device_type_for("auto") == "cuda"
    with pytest.raises(runtime.UserError, match=r"--device mps, but .* sees no Apple GPU .*; pass --device cuda\.$"):
        runtime.device_type_for("mps")


def test_device_mps_without_an_apple_gpu_is_one_sentence(in_process, tmp_path, small_vocab_inputs):
    message = refused(
        FULL, *train_args(small_vocab_inputs, tmp_path / "run", "--device", "mps"), watch=[tmp_path], runner=in_process
    )
    assert "--device mps, but this torch" in message and "sees no Apple GPU" in message
    assert message.rstrip().endswith("pass --device cpu.")


def test_precision_on_the_apple_gpu(monkeypatch):
    assert runtime.resolve_precision("auto", "mps") == "no"  # fp32 unless asked
    assert runtime.resolve_precision("fp32", "mps") == "no"
    assert runtime.resolve_precision("fp16", "mps") == "fp16"
    monkeypatch.setattr(runtime, "mps_supports_bf16", lambda: True)
    assert runtime.resolve_precision("bf16", "mps") == "bf16"
    monkeypatch.setattr(runtime, "mps_supports_bf16", lambda: False)
    with pytest.raises(runtime.UserError, match=r"^bf16 on an Apple GPU needs macOS 14 or newer; use --precision"):
        runtime.resolve_precision("bf16", "mps")
    with pytest.raises(runtime.UserError, match="needs a CUDA or Apple"):
        runtime.resolve_precision("fp16", "cpu")
    autocast = runtime.autocast_for(torch.device("mps"), "fp16")
    assert autocast is not None and runtime.autocast_for(torch.device("mps"), "auto") is None


def test_the_cpu_refusal_does_not_fire_on_a_mac(on_a_mac, monkeypatch):
    monkeypatch.setattr(runtime, "CPU_GUARD_SECONDS", 0)

    def work():
        raise AssertionError("the CPU estimate is asked only for a run that would be on the CPU")

    runtime.refuse_slow_cpu_run("auto", "training a big model", work)
    monkeypatch.setattr(runtime, "gpu_backend", lambda: None)
    with pytest.raises(runtime.UserError, match="no GPU is visible"):
        runtime.refuse_slow_cpu_run("auto", "training a big model", lambda: (10**9, 1e18))


def test_peak_memory_on_the_apple_gpu_is_the_metal_drivers_count(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 123_456_789)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append(True))
    device = torch.device("mps")
    runtime.reset_peak_memory(device)
    assert emptied == [True]
    assert runtime.peak_memory_bytes(device) == 123_456_789
    assert runtime.peak_memory_kind(device) == "mps_driver_allocated"
    assert runtime.peak_memory_kind(torch.device("cpu")) == "process_max_rss"


def test_cuda_only_paths_are_skipped_or_refused_on_the_apple_gpu():
    from studykit.batching import resolve_pad_multiple
    from studykit.config import TrainConfig
    from studykit.loss import resolve_loss_kernel
    from studykit.optimizers import build_adamw, check_runs_here

    mps = torch.device("mps")
    with pytest.raises(runtime.UserError, match="--loss-kernel liger needs a CUDA GPU .* this run is on mps"):
        resolve_loss_kernel("liger", "mps")
    with pytest.raises(runtime.UserError, match="--optimizer paged-adamw8bit .* needs a CUDA GPU; on mps use"):
        check_runs_here("paged-adamw8bit", mps)
    assert resolve_pad_multiple(None, "mps") == 1
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_adamw([{"params": [weight]}], TrainConfig(), mps)
    assert not optimizer.defaults["fused"]  # fused AdamW: CUDA only


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
