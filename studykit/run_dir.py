"""A training run's directory: what marks it as a run, when a command may use it, its log and its run record.

Checkpoint I/O (checkpointing.py) writes into the directory; this module holds the rules about it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from studykit.errors import UserError
from studykit.io import (
    DiskFull,
    atomic_write_text,
    find_partial_directories,
    is_out_of_space,
    read_json,
    refuse_foreign_directory,
)
from studykit.run_state import RunRecord

RUN_RECORD = "run.json"
RUN_LOG = "log.jsonl"
TRAIN_CONFIG = "train_config.json"
RESUME_DIRECTORY = "resume"
# Written when a training stops because it diverged (safeguards.py), so a study can count that rate as the worst.
DIVERGED_RECORD = "diverged.json"
# --report-to tensorboard's event files: the run's record of its curves, not part of the model.
TENSORBOARD_DIRECTORY = "tensorboard"
# Which tracker run this directory writes to, so that --resume continues it (hidden: bookkeeping, never uploaded).
TRACKER_RUN_FILE = ".tracker_run.json"
# Files a training run writes into its output directory; --overwrite removes these and the resume/ and tensorboard/
# directories.
RUN_ARTIFACTS = (
    RUN_RECORD,
    RUN_LOG,
    TRAIN_CONFIG,
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "README.md",
    "loss_curve.png",
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    TRACKER_RUN_FILE,
    DIVERGED_RECORD,
)
# Files that mark a directory as a training run's, finished or not (train_config.json is written before step 1).
RUN_MARKERS = (RUN_RECORD, RUN_LOG, TRAIN_CONFIG, RESUME_DIRECTORY)
CHECKPOINT_NAME = re.compile(r"step-\d+")
# Written last into a resumable checkpoint: its presence marks the checkpoint as complete.
CHECKPOINT_COMPLETE = "trainer_state.json"


def resumable_checkpoints(output_dir: Path) -> list[Path]:
    """Complete resumable checkpoints, oldest first. Unfinished writes are never among them."""
    directory = Path(output_dir) / RESUME_DIRECTORY
    if not directory.is_dir():
        return []
    complete = [
        p for p in directory.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / CHECKPOINT_COMPLETE).exists()
    ]
    return sorted(complete, key=lambda p: p.name)


def is_run_directory(directory: Path) -> bool:
    return any((Path(directory) / name).exists() for name in RUN_MARKERS)


def check_run_directory(output_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any. Changes nothing:
    --overwrite clears the old run only once every input has been checked (clear_previous_run)."""
    output_dir = Path(output_dir)
    for partial in find_partial_directories(output_dir / RESUME_DIRECTORY) + find_partial_directories(output_dir):
        print(
            f"warning: ignoring {partial}, an unfinished write left by a crash; it is never loaded and can be deleted."
        )
    if resume:
        if (output_dir / RUN_RECORD).exists():
            raise UserError(
                f"{output_dir} holds a finished run ({RUN_RECORD}), so there is nothing to resume; "
                "pass --overwrite instead of --resume to train it again."
            )
        checkpoints = resumable_checkpoints(output_dir)
        if not checkpoints:
            raise UserError(
                f"--resume found no complete resumable checkpoint in {output_dir / RESUME_DIRECTORY}; "
                "start again with --overwrite instead of --resume."
            )
        return checkpoints[-1]
    holds_run = is_run_directory(output_dir)
    if holds_run and not overwrite:
        raise UserError(
            f"{output_dir} already holds a run; pass --overwrite to replace it, --resume to continue it, or another "
            "--output-dir."
        )
    # A model directory, a dataset, anything else: the final save would write over files it does not own.
    refuse_foreign_directory(output_dir, holds_run, "training run")
    return None


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite: remove the files an earlier run wrote, the record first, so a half-cleared directory is
    never taken for a finished run."""
    output_dir = Path(output_dir)
    for name in RUN_ARTIFACTS:
        (output_dir / name).unlink(missing_ok=True)
    for directory in (RESUME_DIRECTORY, TENSORBOARD_DIRECTORY):
        # The old run's curves would otherwise be drawn under the new run's.
        shutil.rmtree(output_dir / directory, ignore_errors=True)


def continue_advice(output_dir: Path) -> str:
    """What to run once the cause of a stop (a full disk) is gone: resume from the latest complete checkpoint."""
    checkpoints = resumable_checkpoints(output_dir)
    if checkpoints:
        return f"run the same command with --resume to continue from {checkpoints[-1]}, which is intact."
    return (
        "run the same command with --overwrite to train again (no resumable checkpoint was saved; --save-every N keeps "
        "them)."
    )


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
            raise DiskFull(
                f"the disk holding {self.path} is full: appending to the training log failed; free some space, "
                f"then {continue_advice(self.path.parent)}"
            ) from None


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
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("step"), int)
            and (until_step is None or entry["step"] <= until_step)
        ):
            entries.append(entry)
    return entries


def load_run_record(run_dir: Path) -> Optional[RunRecord]:
    """A finished run's record, or None for a run that has none (yet)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        return None
    values = read_json(path, f"train that run again, or move {Path(run_dir)} out of the way")
    return RunRecord.from_dict(values, str(path))
