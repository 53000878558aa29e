"""Checkpoint I/O: resumable checkpoints (weights, optimizer, schedule, loss scaler, RNG, position) and the final
save (weights or adapter, tokenizer, run.json). Every write lands atomically; every read of a damaged or foreign
checkpoint is one sentence. What a run directory is, and its log, live in run_dir.py."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from studykit.config import RESUME_MAY_CHANGE
from studykit.errors import UserError
from studykit.io import (
    DamagedFile,
    atomic_directory,
    atomic_write_json,
    disk_space_for,
    read_json,
)
from studykit.model_card import write_model_card
from studykit.modeling import count_parameters, is_adapter_directory
from studykit.run_dir import (
    CHECKPOINT_COMPLETE,
    RESUME_DIRECTORY,
    RUN_LOG,
    RUN_RECORD,
    continue_advice,
    read_run_log,
    resumable_checkpoints,
)
from studykit.run_state import RunRecord, TrainingParts, TrainingState

# Files every resumable checkpoint holds besides its weights; CHECKPOINT_COMPLETE, written last, marks it complete.
CHECKPOINT_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "run_identity.json", CHECKPOINT_COMPLETE)
# What a save writes beside the tensors: configs, JSON records, a model card, the RNG state (kilobytes on a CPU,
# more per GPU).
SAVE_OVERHEAD_BYTES = 256 * 1024
# The tokenizer files per vocabulary entry (GPT-2's vocab.json, merges.txt and tokenizer.json: about 3.5 MB for 50,257).
TOKENIZER_BYTES_PER_TOKEN = 80


class UnusableCheckpoint(UserError):
    """A resumable checkpoint that is incomplete, damaged, or from another model or other settings."""


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, e.g. an optimizer's."""
    leaves = torch.utils._pytree.tree_leaves(state)
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves if isinstance(leaf, torch.Tensor))


def weight_bytes(model) -> int:
    """What save_pretrained writes: an adapter's weights only, or every weight of a full model (fp32)."""
    trainable, total = count_parameters(model)
    return 4 * (trainable if hasattr(model, "peft_config") else total)


@contextlib.contextmanager
def no_save_progress_bar():
    """save_pretrained draws a one-step 'Writing model shards' bar; mid-run it only breaks up the training bar."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def save_resumable(parts: TrainingParts, identity: dict[str, Any], state: TrainingState, output_dir: Path) -> None:
    """One complete checkpoint or none: written under a temporary name and renamed into place. Older ones are
    removed separately (prune_resumable), once this one has proved good. Every process must call this."""
    accelerator, model = parts.accelerator, parts.unwrapped_model
    accelerator.wait_for_everyone()
    if parts.sharded:
        from studykit.sharded import gather_optimizer_state, gather_weights

        # Optimizer state keyed by parameter name, not position: it is spread back over the shards by name.
        weights = gather_weights(model)
        optimizer_state = gather_optimizer_state(model, parts.optimizer.optimizer)
    else:
        weights, optimizer_state = None, parts.optimizer.state_dict()
    if accelerator.is_main_process:
        final = Path(output_dir) / RESUME_DIRECTORY / f"step-{state.step:06d}"
        needed = weight_bytes(model) + tensor_bytes(optimizer_state) + SAVE_OVERHEAD_BYTES
        with (
            disk_space_for(
                output_dir,
                needed,
                f"the resumable checkpoint of step {state.step}",
                f"free some space, then {continue_advice(output_dir)}",
            ),
            atomic_directory(final) as staging,
            no_save_progress_bar(),
        ):
            model.save_pretrained(staging, state_dict=weights)
            atomic_write_json(staging / "run_identity.json", identity)
            torch.save(optimizer_state, staging / "optimizer.pt")
            torch.save(parts.scheduler.state_dict(), staging / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            if accelerator.device.type == "mps":
                rng["mps"] = torch.mps.get_rng_state()  # dropout's stream on an Apple GPU
            torch.save(rng, staging / "rng.pt")
            # Written last inside the staging directory: its presence marks the checkpoint as complete.
            atomic_write_json(staging / CHECKPOINT_COMPLETE, state.to_dict())
    accelerator.wait_for_everyone()


def prune_resumable(output_dir: Path, keep: int) -> None:
    for stale in resumable_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


def set_aside_diverged(output_dir: Path, from_step: int) -> None:
    """After training diverged: checkpoints from `from_step` on hold the weights that did it. They are renamed,
    kept for a look but never picked by --resume."""
    for checkpoint in resumable_checkpoints(output_dir):
        if int(checkpoint.name.split("-")[1]) >= from_step:
            os.replace(checkpoint, checkpoint.with_name(checkpoint.name + ".diverged"))


def _incomplete(checkpoint: Path, what: str) -> UnusableCheckpoint:
    return UnusableCheckpoint(
        f"the checkpoint {checkpoint} {what}; delete it to resume from the one before, or start again with --overwrite."
    )


def _load_weights(model, checkpoint: Path) -> None:
    weight_files = sorted(checkpoint.glob("*.safetensors"))
    if not weight_files:
        raise _incomplete(checkpoint, "holds no weights (no .safetensors file)")
    state_dict = {}
    for weight_file in weight_files:
        state_dict.update(_load_safetensors(weight_file))
    if is_adapter_directory(checkpoint):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state_dict)
        # strict=False over the whole model: every base weight is "missing"; only adapter weights must be there.
        missing = [key for key in result.missing_keys if "lora_" in key]
    else:
        result = model.load_state_dict(state_dict, strict=False)
        # Tied weights (GPT-2's lm_head is wte) are saved once: only names of distinct parameters must be present.
        distinct = set(dict(model.named_parameters()))
        missing = [key for key in result.missing_keys if key in distinct]
    if result.unexpected_keys:
        raise UnusableCheckpoint(
            f"the checkpoint {checkpoint} was made for another model ({result.unexpected_keys[:3]}); pass the --model "
            "it was trained from."
        )
    if missing:
        raise _incomplete(checkpoint, f"lacks weights {missing[:3]}")


def _load_sharded(parts: TrainingParts, checkpoint: Path) -> None:
    from studykit.sharded import by_parameter_name, scatter_state

    model = parts.unwrapped_model
    saved = {}
    for weight_file in sorted(checkpoint.glob("*.safetensors")):
        saved.update(_load_safetensors(weight_file))
    adapter_name = getattr(model, "active_adapter", None) if is_adapter_directory(checkpoint) else None
    weights = by_parameter_name(model, saved, adapter_name)
    missing = scatter_state(model, parts.optimizer.optimizer, weights, _load_tensors(checkpoint / "optimizer.pt"))
    if missing:
        raise _incomplete(checkpoint, f"lacks weights {missing[:3]}")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _incomplete(path.parent, f"has {path.name} damaged ({str(error).strip().splitlines()[0]})") from None


def _read_checkpoint_json(checkpoint: Path, name: str) -> dict[str, Any]:
    try:
        return read_json(checkpoint / name)
    except DamagedFile:
        raise _incomplete(checkpoint, f"has {name} damaged") from None


def _load_tensors(path: Path) -> Any:
    """Optimizer, scheduler, scaler and RNG state: tensors and plain values only, never arbitrary pickled objects."""
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of a file it is about to refuse anyway.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _incomplete(
            path.parent, f"has {path.name} holding more than tensors (refused: unpickling it could run code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise _incomplete(path.parent, f"has {path.name} damaged") from None


def check_resume_matches(checkpoint: Path, identity: dict[str, Any]) -> None:
    """A resumed run continues only under the settings it started with; otherwise its steps would not be the
    steps the first run would have taken (and the optimizer state would silently override a new --lr)."""
    saved = _read_checkpoint_json(checkpoint, "run_identity.json")
    current = dict(identity)
    saved_config, current_config = saved.pop("config"), current.pop("config")
    changed = [
        f"--{key.replace('_', '-')} (was {saved_config[key]}, now {current_config.get(key)})"
        for key in saved_config
        if key not in RESUME_MAY_CHANGE and saved_config[key] != current_config.get(key)
    ]
    changed += [f"{key} (was {saved[key]}, now {current.get(key)})" for key in saved if saved[key] != current.get(key)]
    if changed:
        raise UnusableCheckpoint(
            f"the checkpoint {checkpoint} belongs to a run with other settings: {'; '.join(changed[:3])}; "
            "resume with the command that started the run plus --resume, or start again with --overwrite."
        )


def load_resumable(checkpoint: Path, parts: TrainingParts, identity: dict[str, Any]) -> TrainingState:
    """Restore weights, optimizer, schedule, loss scaler and RNG from a checkpoint made under `identity`."""
    checkpoint = Path(checkpoint)
    missing = [name for name in CHECKPOINT_STATE_FILES if not (checkpoint / name).exists()]
    if missing:
        raise _incomplete(checkpoint, f"lacks {', '.join(missing)}")
    check_resume_matches(checkpoint, identity)
    if parts.sharded:
        _load_sharded(parts, checkpoint)
    else:
        _load_weights(parts.unwrapped_model, checkpoint)
        parts.optimizer.load_state_dict(_load_tensors(checkpoint / "optimizer.pt"))
    parts.scheduler.load_state_dict(_load_tensors(checkpoint / "scheduler.pt"))
    scaler = parts.accelerator.scaler
    if scaler is not None and (checkpoint / "scaler.pt").exists():
        scaler.load_state_dict(_load_tensors(checkpoint / "scaler.pt"))
    rng = _load_tensors(checkpoint / "rng.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "mps" in rng and parts.accelerator.device.type == "mps":
        torch.mps.set_rng_state(rng["mps"])
    try:
        return TrainingState(**_read_checkpoint_json(checkpoint, CHECKPOINT_COMPLETE))
    except TypeError:
        raise _incomplete(checkpoint, f"has {CHECKPOINT_COMPLETE} damaged (unknown fields)") from None


def save_final(parts: TrainingParts, tokenizer, record: RunRecord, data_meta: dict[str, Any], output_dir: Path) -> None:
    """Weights, tokenizer and model card are staged, moved into place file by file, and run.json is written last. Every
    process must call this."""
    accelerator, model = parts.accelerator, parts.unwrapped_model
    accelerator.wait_for_everyone()
    if parts.sharded:
        from studykit.sharded import gather_weights

        state_dict = gather_weights(model)
    else:
        state_dict = None
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        needed = weight_bytes(model) + TOKENIZER_BYTES_PER_TOKEN * len(tokenizer) + SAVE_OVERHEAD_BYTES
        with disk_space_for(
            output_dir, needed, "the final checkpoint", f"free some space, then {continue_advice(output_dir)}"
        ):
            with atomic_directory(output_dir / ".final") as staging, no_save_progress_bar():
                model.save_pretrained(staging, state_dict=state_dict)
                tokenizer.save_pretrained(staging)
                # Written over the placeholder README.md peft's save_pretrained leaves beside an adapter.
                write_model_card(staging, record, data_meta, read_run_log(output_dir / RUN_LOG))
            staged = output_dir / ".final"
            for path in staged.iterdir():
                os.replace(path, output_dir / path.name)
            staged.rmdir()
            record.checkpoint_bytes = sum(
                (output_dir / name).stat().st_size
                for name in ("model.safetensors", "adapter_model.safetensors")
                if (output_dir / name).exists()
            )
            atomic_write_json(output_dir / RUN_RECORD, record.to_dict())
    accelerator.wait_for_everyone()
