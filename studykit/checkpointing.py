"""Final checkpoints, resumable checkpoints and the run log. Every write lands atomically."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from studykit.config import RESUME_MAY_CHANGE, config_to_dict
from studykit.errors import UserError
from studykit.io import (DamagedFile, DiskFull, atomic_directory, atomic_write_json, atomic_write_text, disk_space_for, find_partial_directories,
                         is_out_of_space, read_json, visible_entries)
from studykit.modeling import count_parameters, is_adapter_directory

if TYPE_CHECKING:
    from studykit.trainer import PreparedRun, TrainingState

RUN_RECORD = "run.json"
RUN_LOG = "log.jsonl"
RESUME_DIRECTORY = "resume"
# Files a training run writes into its output directory; --overwrite removes these and the resume/ directory.
RUN_ARTIFACTS = (RUN_RECORD, RUN_LOG, "train_config.json", "model.safetensors", "config.json", "generation_config.json",
                 "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


# Files that mark a directory as a training run's, finished or not (train_config.json is written before step 1).
RUN_MARKERS = (RUN_RECORD, RUN_LOG, "train_config.json", RESUME_DIRECTORY)
# Files every resumable checkpoint holds besides its weights; trainer_state.json, written last, marks it complete.
CHECKPOINT_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "run_identity.json", "trainer_state.json")
CHECKPOINT_NAME = re.compile(r"step-\d+")
# What a save writes beside the tensors: configs, JSON records, a model card, the RNG state (kilobytes on a CPU,
# more per GPU).
SAVE_OVERHEAD_BYTES = 256 * 1024
# The tokenizer files per vocabulary entry (GPT-2's vocab.json, merges.txt and tokenizer.json: about 3.5 MB for 50,257).
TOKENIZER_BYTES_PER_TOKEN = 80


class Interrupted(UserError):
    def __init__(self, signal_name: str, step: int, output_dir: Path) -> None:
        self.signal_name, self.step, self.output_dir = signal_name, step, output_dir
        # The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))
        super().__init__(
            f"training stopped by {signal_name} after step {step}; a resumable checkpoint is in "
            f"{output_dir / RESUME_DIRECTORY}: run the same command with --resume to continue."
        )

    def __reduce__(self):
        # Rebuilt from its own arguments when it crosses a process boundary (the study trains in a child process).
        return type(self), (self.signal_name, self.step, self.output_dir)


class UnusableCheckpoint(UserError):
    """A resumable checkpoint that is incomplete, corrupt, or from another model or other settings."""


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """Complete resumable checkpoints, oldest first. Unfinished writes are never among them."""
    directory = Path(output_dir) / RESUME_DIRECTORY
    if not directory.is_dir():
        return []
    complete = [p for p in directory.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / "trainer_state.json").exists()]
    return sorted(complete, key=lambda p: p.name)


def is_run_directory(directory: Path) -> bool:
    return any((Path(directory) / name).exists() for name in RUN_MARKERS)


def check_run_directory(output_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any. Changes nothing:
    --overwrite clears the old run only once every input has been checked (clear_previous_run)."""
    output_dir = Path(output_dir)
    for partial in find_partial_directories(output_dir / RESUME_DIRECTORY) + find_partial_directories(output_dir):
        print(f"warning: ignoring {partial}, an unfinished write left by a crash; it is never loaded and can be deleted.")
    if resume:
        if (output_dir / RUN_RECORD).exists():
            raise UserError(f"{output_dir} holds a finished run ({RUN_RECORD}), so there is nothing to resume; "
                            "pass --overwrite instead of --resume to train it again.")
        checkpoints = resumable_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(f"--resume found no complete resumable checkpoint in {output_dir / RESUME_DIRECTORY}; "
                            "start again with --overwrite instead of --resume.")
        return checkpoints[-1]
    holds_run = is_run_directory(output_dir)
    if holds_run and not overwrite:
        raise UserError(f"{output_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, or another --output-dir.")
    others = visible_entries(output_dir)
    if others and not holds_run:
        # A model directory, a dataset, anything else: the final save would write over files it does not own.
        raise UserError(f"{output_dir} is not empty and holds no training run ({', '.join(others[:3])}); "
                        "choose an empty or new --output-dir.")
    return None


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite: remove the files an earlier run wrote, the record first, so a half-cleared directory is
    never taken for a finished run."""
    output_dir = Path(output_dir)
    for name in RUN_ARTIFACTS:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / RESUME_DIRECTORY, ignore_errors=True)


class RunLog:
    """log.jsonl: one line per logged step, appended in one write each, so a crash can at worst leave a torn
    last line. A resumed run keeps the complete lines up to its checkpoint."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int = 0) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        kept = read_run_log(self.path, keep_until_step) if keep_until_step else []
        atomic_write_text(self.path, "".join(json.dumps(entry) + "\n" for entry in kept))

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry) + "\n")
        except OSError as error:
            if not is_out_of_space(error):
                raise
            # A torn last line is dropped when the log is read back.
            raise DiskFull(f"the disk holding {self.path} is full: appending to the training log failed; free some space, "
                           f"then {continue_advice(self.path.parent)}") from None


def read_run_log(path: Path, until_step: Optional[int] = None) -> list[dict[str, Any]]:
    """The complete entries of a log.jsonl; a line torn by a crash (or garbled on disk) is dropped."""
    entries = []
    if not Path(path).exists():
        return entries
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and (until_step is None or entry["step"] <= until_step):
            entries.append(entry)
    return entries


def continue_advice(output_dir: Path) -> str:
    """What to run once the cause of a stop (a full disk) is gone: resume from the latest complete checkpoint."""
    checkpoints = resumable_checkpoints(output_dir)
    if checkpoints:
        return f"run the same command with --resume to continue from {checkpoints[-1]}, which is intact."
    return ("run the same command with --overwrite to train again (no resumable checkpoint was saved; --save-every N keeps "
            "them).")


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


def _unwrapped(run: "PreparedRun"):
    return run.accelerator.unwrap_model(run.model)


def is_sharded(run: "PreparedRun") -> bool:
    """FSDP: each process holds a slice of the weights and optimizer state, so saving and loading are collectives."""
    from studykit.runtime import parallelism

    return parallelism(run.accelerator) == "FSDP"


def run_identity(run: "PreparedRun") -> dict[str, Any]:
    """What a resumed run must share with the checkpoint for its remaining steps to be the ones the first run
    would have taken: the settings, the data, the step count that shapes the schedule, the examples per step."""
    return {"config": config_to_dict(run.config), "data_fingerprint": run.data_meta["fingerprint"], "total_steps": run.total_steps,
            "examples_per_step": run.config.effective_batch * run.accelerator.num_processes,
            # FSDP checkpoints key the optimizer state by parameter name, the others by position.
            "fsdp": is_sharded(run)}


def save_resumable(run: "PreparedRun", state: "TrainingState", output_dir: Path) -> None:
    """One complete checkpoint or none: written under a temporary name and renamed into place. Older ones are
    removed separately (prune_resumable), once this one has proved good."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if is_sharded(run):
        from studykit.sharded import gather_optimizer_state, gather_weights

        # Optimizer state keyed by parameter name, not position: it is spread back over the shards by name.
        weights = gather_weights(_unwrapped(run))
        optimizer_state = gather_optimizer_state(_unwrapped(run), run.optimizer.optimizer)
    else:
        weights, optimizer_state = None, run.optimizer.state_dict()
    if accelerator.is_main_process:
        final = Path(output_dir) / RESUME_DIRECTORY / f"step-{state.step:06d}"
        needed = weight_bytes(_unwrapped(run)) + tensor_bytes(optimizer_state) + SAVE_OVERHEAD_BYTES
        with (disk_space_for(output_dir, needed, f"the resumable checkpoint of step {state.step}", f"free some space, then "
                             f"{continue_advice(output_dir)}"),
              atomic_directory(final) as staging, no_save_progress_bar()):
            _unwrapped(run).save_pretrained(staging, state_dict=weights)
            atomic_write_json(staging / "run_identity.json", run_identity(run))
            torch.save(optimizer_state, staging / "optimizer.pt")
            torch.save(run.scheduler.state_dict(), staging / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), staging / "scaler.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, staging / "rng.pt")
            # Written last inside the staging directory: its presence marks the checkpoint as complete.
            atomic_write_json(staging / "trainer_state.json", state.to_dict())
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
    return UnusableCheckpoint(f"the checkpoint {checkpoint} {what}; delete it to resume from the one before, or start again with --overwrite.")


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
        raise UnusableCheckpoint(f"the checkpoint {checkpoint} was made for another model ({result.unexpected_keys[:3]}); pass the --model it was trained from.")
    if missing:
        raise _incomplete(checkpoint, f"lacks weights {missing[:3]}")


def _load_sharded(run: "PreparedRun", checkpoint: Path) -> None:
    from studykit.sharded import by_parameter_name, scatter_state

    model = _unwrapped(run)
    saved = {}
    for weight_file in sorted(checkpoint.glob("*.safetensors")):
        saved.update(_load_safetensors(weight_file))
    adapter_name = getattr(model, "active_adapter", None) if is_adapter_directory(checkpoint) else None
    weights = by_parameter_name(model, saved, adapter_name)
    missing = scatter_state(model, run.optimizer.optimizer, weights, _load_tensors(checkpoint / "optimizer.pt"))
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
        raise _incomplete(path.parent, f"has {path.name} holding more than tensors (refused: unpickling it could run code)") from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise _incomplete(path.parent, f"has {path.name} damaged") from None


def check_resume_matches(checkpoint: Path, run: "PreparedRun") -> None:
    """A resumed run continues only under the settings it started with; otherwise its steps would not be the
    steps the first run would have taken (and the optimizer state would silently override a new --lr)."""
    saved = _read_checkpoint_json(checkpoint, "run_identity.json")
    current = run_identity(run)
    saved_config, current_config = saved.pop("config"), current.pop("config")
    changed = [f"--{key.replace('_', '-')} (was {saved_config[key]}, now {current_config.get(key)})"
               for key in saved_config if key not in RESUME_MAY_CHANGE and saved_config[key] != current_config.get(key)]
    changed += [f"{key} (was {saved[key]}, now {current[key]})" for key in saved if saved[key] != current[key]]
    if changed:
        raise UnusableCheckpoint(f"the checkpoint {checkpoint} belongs to a run with other settings: {'; '.join(changed[:3])}; "
                        "resume with the command that started the run plus --resume, or start again with --overwrite.")


def load_resumable(checkpoint: Path, run: "PreparedRun") -> "TrainingState":
    from studykit.trainer import TrainingState

    checkpoint = Path(checkpoint)
    missing = [name for name in CHECKPOINT_STATE_FILES if not (checkpoint / name).exists()]
    if missing:
        raise _incomplete(checkpoint, f"lacks {', '.join(missing)}")
    check_resume_matches(checkpoint, run)
    if is_sharded(run):
        _load_sharded(run, checkpoint)
    else:
        _load_weights(_unwrapped(run), checkpoint)
        run.optimizer.load_state_dict(_load_tensors(checkpoint / "optimizer.pt"))
    run.scheduler.load_state_dict(_load_tensors(checkpoint / "scheduler.pt"))
    if run.accelerator.scaler is not None and (checkpoint / "scaler.pt").exists():
        run.accelerator.scaler.load_state_dict(_load_tensors(checkpoint / "scaler.pt"))
    rng = _load_tensors(checkpoint / "rng.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved_state = _read_checkpoint_json(checkpoint, "trainer_state.json")
    try:
        return TrainingState(**saved_state)
    except TypeError:
        raise _incomplete(checkpoint, "has trainer_state.json damaged (unknown fields)") from None


def save_final(run: "PreparedRun", state: "TrainingState", output_dir: Path, record: dict[str, Any]) -> None:
    """Weights and tokenizer are staged, moved into place file by file, and run.json is written last."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if is_sharded(run):
        from studykit.sharded import gather_weights

        state_dict = gather_weights(_unwrapped(run))
    else:
        state_dict = None
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        needed = weight_bytes(_unwrapped(run)) + TOKENIZER_BYTES_PER_TOKEN * len(run.tokenizer) + SAVE_OVERHEAD_BYTES
        with disk_space_for(output_dir, needed, "the final checkpoint", f"free some space, then {continue_advice(output_dir)}"):
            with atomic_directory(output_dir / ".final") as staging, no_save_progress_bar():
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
    return read_json(path, f"train that run again, or move {Path(run_dir)} out of the way") if path.exists() else None
