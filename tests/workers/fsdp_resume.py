"""Run by tests/test_fsdp.py under torch.distributed.run with 2 CPU processes (gloo): FSDP2-sharded GPT-2 (full or
LoRA) trains 3 steps straight, and again 2 steps -> checkpointing.save_resumable -> a fresh, zeroed, sharded model
-> checkpointing.load_resumable -> 1 step -> trainer.dev_loss over three batches;
trainer.weights_are_finite with a NaN in one process's slice. Writes what the test
compares to OUT/result-<method>.json.

accelerate shards only across GPUs, so the trainer cannot run FSDP on a CPU; this drives the checkpoint code with
real FSDP2 shards and a stand-in for the accelerator's few attributes that code reads.
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studykit import checkpointing  # noqa: E402
from studykit.config import TrainConfig  # noqa: E402
from studykit.data import collate  # noqa: E402
from studykit.loss import batch_nll  # noqa: E402
from studykit.methods import grouped  # noqa: E402
from studykit.metrics import score_sequences  # noqa: E402
from studykit.modeling import wrap_with_lora  # noqa: E402
from studykit.run_dir import resumable_checkpoints  # noqa: E402
from studykit.run_state import PreparedRun, TrainingParts, TrainingState  # noqa: E402
from studykit.safeguards import weights_are_finite  # noqa: E402
from studykit.sharded import gather_weights  # noqa: E402
from studykit.trainer import dev_loss  # noqa: E402

VALIDATION_SEQUENCES = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]


def build(model_dir: str, method: str, mesh, zeroed: bool, sharded: bool = True):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    if method == "lora":
        model = wrap_with_lora(model, 4, 8.0, 0.0, ["attention"])
    if zeroed:  # nothing of the first run's weights may survive but what the checkpoint restores
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.zero_()
    if sharded:
        blocks = model.get_base_model().transformer.h if method == "lora" else model.transformer.h
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(grouped(model, 0.1, lambda name: 1e-2), lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    accelerator = SimpleNamespace(
        distributed_type="FSDP",
        num_processes=dist.get_world_size(),
        process_index=dist.get_rank(),
        is_main_process=dist.get_rank() == 0,
        wait_for_everyone=dist.barrier,
        unwrap_model=lambda module: module,
        scaler=None,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        reduce=sum_over_processes,
    )
    # One sequence per validation batch, three batches for two processes: one process has a batch fewer.
    config = TrainConfig(model=model_dir, max_steps=3, batch_size=2, grad_accum=1, eval_batch_size=1)
    parts = TrainingParts(accelerator, model, SimpleNamespace(optimizer=optimizer), scheduler)
    return PreparedRun(
        config, parts, SimpleNamespace(pad_token_id=0), [], VALIDATION_SEQUENCES, {"training_fingerprint": "test"}, 3, 3
    )


def sum_over_processes(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
    assert reduction == "sum"
    dist.all_reduce(tensor)
    return tensor


def step_batch(step: int, rank: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return collate(torch.randint(0, vocab_size, (2, 16), generator=generator).tolist(), 0)


def train_step(run: PreparedRun, step: int, ranks: list[int] | None = None) -> None:
    """One step with the trainer's loss on this process's batch (or, unsharded, on the batches of all `ranks`)."""
    world = dist.get_world_size()
    ranks = ranks or [dist.get_rank()]
    step_tokens = world * 2 * 15
    for rank in ranks:
        nll = batch_nll(run.model, step_batch(step, rank, run.model.config.vocab_size), contextlib.nullcontext).total
        # As in trainer.forward_backward: FSDP averages over processes, so each scales by their number.
        (nll * (world if len(ranks) == 1 else 1) / step_tokens).backward()
    run.parts.optimizer.optimizer.step()
    run.parts.optimizer.optimizer.zero_grad(set_to_none=True)
    run.parts.scheduler.step()


def main() -> None:
    model_dir, out_dir, method = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    straight = build(model_dir, method, mesh, zeroed=False)
    for step in range(3):
        train_step(straight, step)
    expected = gather_weights(straight.model)
    # The loss applies the output layer outside the model's forward: its sharded gradient must still be the one a
    # single process gets from both processes' batches.
    if dist.get_rank() == 0:
        single = build(model_dir, method, mesh, zeroed=False, sharded=False)
        for step in range(3):
            train_step(single, step, ranks=list(range(dist.get_world_size())))
        single_weights = single.model.state_dict()
        fsdp_vs_single_process = max(float((expected[name] - single_weights[name]).abs().max()) for name in expected)

    interrupted = build(model_dir, method, mesh, zeroed=False)
    for step in range(2):
        train_step(interrupted, step)
    at_checkpoint = gather_weights(interrupted.model)
    run_dir = out_dir / method
    checkpointing.save_resumable(
        interrupted.parts, interrupted.identity(), TrainingState(step=2, tokens_seen=64), run_dir
    )
    checkpoint = resumable_checkpoints(run_dir)[-1]

    resumed = build(model_dir, method, mesh, zeroed=True)
    state = checkpointing.load_resumable(checkpoint, resumed.parts, resumed.identity())
    train_step(resumed, state.step)
    result = gather_weights(resumed.model)
    # Every process must take part in every forward pass, however the validation batches divide among them.
    sharded_dev_loss = dev_loss(resumed)
    # A NaN in one process's slice alone: every process must see it, or they would part ways.
    finite_before = weights_are_finite(interrupted.parts)
    if dist.get_rank() == 1:
        with torch.no_grad():
            next(p for p in interrupted.model.parameters() if p.requires_grad).to_local().view(-1)[0] = float("nan")
    finite_after = weights_are_finite(interrupted.parts)

    if dist.get_rank() == 0:
        trainable = [name for name, parameter in resumed.model.named_parameters() if parameter.requires_grad]
        report = {
            "step": state.step,
            "trainable": len(trainable),
            "resumed_vs_straight": max(float((result[name] - expected[name]).abs().max()) for name in expected),
            "moved_by_training": max(float((expected[name] - at_checkpoint[name]).abs().max()) for name in trainable),
            "files": sorted(path.name for path in checkpoint.iterdir()),
            "finite_on_main": [finite_before, finite_after],
            "fsdp_vs_single_process": fsdp_vs_single_process,
        }
        # The gathered weights load with transformers / peft like any checkpoint.
        if method == "full":
            from transformers import GPT2LMHeadModel

            loaded = GPT2LMHeadModel.from_pretrained(checkpoint).state_dict()
            report["checkpoint_vs_gathered"] = max(
                float((loaded[name] - at_checkpoint[name]).abs().max()) for name in loaded
            )
            whole = GPT2LMHeadModel.from_pretrained(model_dir)
            whole.load_state_dict(result)
            report["dev_loss"] = [
                sharded_dev_loss,
                score_sequences(whole, VALIDATION_SEQUENCES, 1, torch.device("cpu"), 0).mean_nll,
            ]
        else:
            from peft import PeftModel
            from transformers import GPT2LMHeadModel

            loaded = dict(
                PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir), checkpoint).named_parameters()
            )
            report["checkpoint_vs_gathered"] = max(
                float((loaded[name] - at_checkpoint[name]).abs().max()) for name in trainable
            )
        (out_dir / f"result-{method}.json").write_text(json.dumps(report))
    # Both processes leave together: one tearing down its connections while the other still works once aborted
    # the worker ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown, where threads the process group left behind can abort a finished run.
    os._exit(0)
