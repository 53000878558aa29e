"""The training scripts, unchanged, under `accelerate launch` with two CPU processes (DDP over gloo).

Each step's window is planned from the effective batch alone and cut across processes, so two processes with
half the micro-batch must reproduce the single-process loss curve, validation loss and weights.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_model, run_script

DDP_CONFIG = REPO_ROOT / "configs" / "accelerate" / "ddp.yaml"
FSDP_CONFIG = REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml"
BUDGET = ["--max-steps", "4", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--eval-batch-size", "4"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DDP_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(REPO_ROOT / script),
        *map(str, args),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"accelerate launch exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_tokenizer, processed_dir):
    root = tmp_path_factory.mktemp("distributed")
    # No dropout: each process draws its own masks, so only a deterministic model can match exactly.
    model = build_tiny_model(root / "model", gpt2_tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    common = ["--model", model, "--data-dir", processed_dir, *BUDGET]
    single = run_script(
        "training/train_full_ft.py", *common, "--output-dir", root / "single", "--batch-size", "4", "--grad-accum", "1"
    )
    ddp = accelerate_launch(
        "training/train_full_ft.py", *common, "--output-dir", root / "ddp", "--batch-size", "2", "--grad-accum", "1"
    )
    # LoRA with gradient accumulation and checkpointing: no_sync on all but the last micro-batch of each process.
    lora = ["--rank", "4", "--dropout", "0", "--gradient-checkpointing", *common]
    lora_single = run_script(
        "training/train_lora.py", *lora, "--output-dir", root / "lora_single", "--batch-size", "4", "--grad-accum", "1"
    )
    lora_ddp = accelerate_launch(
        "training/train_lora.py", *lora, "--output-dir", root / "lora_ddp", "--batch-size", "1", "--grad-accum", "2"
    )
    return {
        "root": root,
        "stdout": {
            "single": single.stdout,
            "ddp": ddp.stdout,
            "lora_single": lora_single.stdout,
            "lora_ddp": lora_ddp.stdout,
        },
    }


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("single, ddp", [("single", "ddp"), ("lora_single", "lora_ddp")])
def test_two_processes_reproduce_the_single_process_loss_curve(runs, single, ddp):
    reference, distributed = read_log(runs["root"] / single), read_log(runs["root"] / ddp)
    # One line per step: a second writer would have doubled them.
    assert [entry["step"] for entry in distributed] == [1, 2, 3, 4] == [entry["step"] for entry in reference]
    for key in ("train_loss", "lr"):
        assert [entry[key] for entry in distributed] == pytest.approx([entry[key] for entry in reference], rel=1e-5), (
            key
        )
    validation = {entry["step"]: entry["dev_loss"] for entry in distributed if "dev_loss" in entry}
    expected = {entry["step"]: entry["dev_loss"] for entry in reference if "dev_loss" in entry}
    assert validation.keys() == expected.keys() == {2, 4}
    assert validation == pytest.approx(expected, rel=1e-5)
    assert [entry["tokens_seen"] for entry in distributed] == [entry["tokens_seen"] for entry in reference]
    record = json.loads((runs["root"] / ddp / "run.json").read_text())
    assert record["num_processes"] == 2 and record["effective_batch"] == 4 and record["parallelism"] == "DDP"
    assert json.loads((runs["root"] / single / "run.json").read_text())["parallelism"] == "single process"


def test_two_processes_end_with_the_single_process_weights(runs):
    from safetensors.torch import load_file

    reference = load_file(runs["root"] / "single" / "model.safetensors")
    distributed = load_file(runs["root"] / "ddp" / "model.safetensors")
    assert reference.keys() == distributed.keys()
    for name, weight in reference.items():
        assert torch.allclose(distributed[name], weight, atol=1e-5), name


def test_only_the_main_process_writes_and_reports(runs):
    ddp = runs["root"] / "ddp"
    assert sorted(p.name for p in (ddp / "resume").iterdir()) == ["step-000002"]
    assert not list(ddp.glob("*partial*")) and not list((ddp / "resume").glob("*partial*"))
    assert runs["stdout"]["ddp"].count("step 2: dev loss") == 1
    assert runs["stdout"]["ddp"].count("memory estimate at micro-batch") == 1
    assert "processes: 2" in runs["stdout"]["ddp"]


def test_accelerate_configs_load_and_fsdp_wraps_gpt2_blocks():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(DDP_CONFIG))
    fsdp = load_config_from_file(str(FSDP_CONFIG))
    assert str(ddp.distributed_type).endswith("MULTI_GPU")
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPT2Block"
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    assert GPT2Block.__name__ == fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
