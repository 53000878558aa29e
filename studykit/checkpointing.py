"""Final checkpoints, resumable checkpoints and the run log. Every write lands atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from studykit.errors import UserError
from studykit.io import atomic_directory, atomic_write_json, find_partial_directories, read_json
from studykit.modeling import is_adapter_directory

if TYPE_CHECKING:
    from studykit.trainer import PreparedRun, TrainingState

RUN_RECORD = "run.json"
RUN_LOG = "log.jsonl"
RESUME_DIRECTORY = "resume"
# Files a training run writes into its output directory; --overwrite removes exactly these.
RUN_ARTIFACTS = (RUN_RECORD, RUN_LOG, "train_config.json", "model.safetensors", "config.json", "generation_config.json",
                 "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


class Interrupted(UserError):
    exit_code = 130

    def __init__(self, signal_name: str, step: int, output_dir: Path) -> None:
        super().__init__(
            f"training stopped by {signal_name} after step {step}; a resumable checkpoint is in "
            f"{output_dir / RESUME_DIRECTORY}: run the same command with --resume to continue."
        )


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """Complete resumable checkpoints, oldest first. Unfinished writes are never among them."""
    directory = Path(output_dir) / RESUME_DIRECTORY
    if not directory.is_dir():
        return []
    complete = [p for p in directory.glob("step-*") if p.is_dir() and "partial" not in p.name and (p / "trainer_state.json").exists()]
    return sorted(complete, key=lambda p: p.name)


def check_output_directory(output_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any."""
    output_dir = Path(output_dir)
    for partial in find_partial_directories(output_dir / RESUME_DIRECTORY) + find_partial_directories(output_dir):
        print(f"warning: ignoring {partial}, an unfinished write left by a crash; it is never loaded and can be deleted.")
    if resume:
        checkpoints = resumable_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"--resume found no complete resumable checkpoint in {output_dir / RESUME_DIRECTORY}; run without --resume.")
        return checkpoints[-1]
    holds_run = any((output_dir / name).exists() for name in (RUN_RECORD, RUN_LOG, "train_config.json", RESUME_DIRECTORY))
    if holds_run and not overwrite:
        raise UserError(f"{output_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, or another --output-dir.")
    if holds_run:
        # The record goes first: a directory without run.json is never taken for a finished run.
        for name in RUN_ARTIFACTS:
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / RESUME_DIRECTORY, ignore_errors=True)
    return None


class RunLog:
    """log.jsonl: one line per logged step. A resumed run keeps the lines up to its checkpoint."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int = 0) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        kept: list[str] = []
        if keep_until_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= keep_until_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry) + "\n")


def _unwrapped(run: "PreparedRun"):
    return run.accelerator.unwrap_model(run.model)


def save_resumable(run: "PreparedRun", state: "TrainingState", output_dir: Path, keep: int) -> None:
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = Path(output_dir) / RESUME_DIRECTORY / f"step-{state.step:06d}"
        with atomic_directory(final) as staging:
            _unwrapped(run).save_pretrained(staging)
            torch.save(run.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), staging / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, staging / "rng.pt")
            # Written last inside the staging directory: its presence marks the checkpoint as complete.
            atomic_write_json(staging / "trainer_state.json", state.to_dict())
        for stale in resumable_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_weights(model, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    if is_adapter_directory(checkpoint):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    weight_files = sorted(checkpoint.glob("*.safetensors"))
    if not weight_files:
        raise UserError(f"the checkpoint {checkpoint} holds no weights; resume from another one or start again with --overwrite.")
    state_dict = {}
    for weight_file in weight_files:
        state_dict.update(load_file(weight_file))
    # Tied weights (GPT-2's lm_head is wte) are saved once, so they are missing here by design.
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:
        raise UserError(f"the checkpoint {checkpoint} was made for another model ({result.unexpected_keys[:3]}); pass the --model it was trained from.")


def _load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_resumable(checkpoint: Path, run: "PreparedRun") -> "TrainingState":
    from studykit.trainer import TrainingState

    checkpoint = Path(checkpoint)
    _load_weights(_unwrapped(run), checkpoint)
    run.optimizer.load_state_dict(_load_tensors(checkpoint / "optimizer.pt"))
    run.scheduler.load_state_dict(_load_tensors(checkpoint / "scheduler.pt"))
    if run.accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
        run.accelerator.scaler.load_state_dict(_load_tensors(checkpoint / "scaler.pt"))
    rng = _load_tensors(checkpoint / "rng.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainingState(**read_json(checkpoint / "trainer_state.json"))


def save_final(run: "PreparedRun", state: "TrainingState", output_dir: Path, record: dict[str, Any]) -> None:
    """Weights and tokenizer are staged, moved into place file by file, and run.json is written last."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    # Under FSDP each process holds a shard: gathering the whole weights is a collective every process joins.
    state_dict = accelerator.get_state_dict(run.model) if accelerator.distributed_type == "FSDP" else None
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        with atomic_directory(output_dir / ".final") as staging:
            _unwrapped(run).save_pretrained(staging, state_dict=state_dict)
            run.tokenizer.save_pretrained(staging)
        staged = output_dir / ".final"
        for path in staged.iterdir():
            os.replace(path, output_dir / path.name)
        staged.rmdir()
        record["checkpoint_bytes"] = sum(
            (output_dir / name).stat().st_size for name in ("model.safetensors", "adapter_model.safetensors") if (output_dir / name).exists()
        )
        atomic_write_json(output_dir / RUN_RECORD, record)
    accelerator.wait_for_everyone()


def load_run_record(run_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / RUN_RECORD
    return read_json(path) if path.exists() else None
