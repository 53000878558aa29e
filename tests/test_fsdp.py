"""Resumable checkpoints and validation under FSDP: every process joins the gather, a run resumed from the
checkpoint takes exactly the step an uninterrupted one does, uneven validation batches do not stall, and a
NaN in one process's slice is seen by all. Two CPU processes over gloo with real FSDP2 shards
(tests/workers/fsdp_resume.py); accelerate itself shards only across GPUs, so this drives the checkpoint code
directly rather than through the training scripts."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, build_tiny_model
from test_distributed import free_port


@pytest.fixture(scope="module")
def model_without_dropout(tmp_path_factory, gpt2_tokenizer):
    return build_tiny_model(
        tmp_path_factory.mktemp("fsdp-model"), gpt2_tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_checkpoint_is_gathered_whole_and_resumes_to_the_uninterrupted_weights(
    method, model_without_dropout, tmp_path
):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO_ROOT / "tests" / "workers" / "fsdp_resume.py"),
        str(model_without_dropout),
        str(tmp_path),
        method,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Saving from the main process alone would wait forever for the other process's shards: the timeout is the failure.
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / f"result-{method}.json").read_text())
    assert report["step"] == 2
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert {weights, "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= set(report["files"])
    # The checkpoint holds the whole weights, not one process's slice, and loads with transformers / peft.
    assert report["checkpoint_vs_gathered"] == 0.0
    # Training moved the weights, and the resumed run (zeroed, then restored: weights, AdamW moments, schedule)
    # took the same third step as the run that never stopped.
    assert report["moved_by_training"] > 1e-4
    # The trainer's loss (output layer applied outside the model's forward) gives the sharded model the weights a
    # single process reaches on both processes' batches.
    assert report["fsdp_vs_single_process"] < 1e-5
    assert report["resumed_vs_straight"] < 1e-6
    # A NaN in the other process's slice of the weights is seen by the main process too.
    assert report["finite_on_main"] == [True, False]
    if method == "full":
        # Three validation batches over two processes: both take part in every pass, and the sum is the whole split's.
        sharded, whole = report["dev_loss"]
        assert sharded == pytest.approx(whole, rel=1e-6)
