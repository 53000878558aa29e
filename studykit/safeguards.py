"""What keeps a run's work safe, beside the training loop rather than woven through it.

The loop makes three calls: `check_step` after each optimizer step, `save_if_due` after each recorded step and
`check_final` before the final save. Behind them: a streak of non-finite steps stops the run and sets aside the
checkpoints that hold the weights that produced it; a checkpoint replaces the older ones only once the step after
it is finite; checkpoints are saved on schedule and when a signal asks the run to stop; no checkpoint is saved from
weights that are NaN or inf.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

import torch

from studykit import checkpointing
from studykit.errors import UserError
from studykit.io import atomic_write_json
from studykit.run_dir import DIVERGED_RECORD, RESUME_DIRECTORY, resumable_checkpoints
from studykit.run_state import PreparedRun, TrainingParts, TrainingState

# A loss that is NaN or inf this many steps in a row ends the run; fp16 overflow alone is skipped by the scaler.
NONFINITE_PATIENCE = 3


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


class Diverged(UserError):
    """A training that diverged. A study's learning-rate sweep counts it as the worst rate rather than stopping."""


class InterruptFlag:
    """SIGINT and SIGTERM finish the current step, save a resumable checkpoint, then exit."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "InterruptFlag":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            # A second Ctrl-C means "now": stop without the checkpoint (atomic writes leave no half-written one).
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled, agreed by all, so every process saves and stops at the same step.
        processes_where, not accelerate's set_trigger/check_trigger: one agreement for every decision here, and no
        reduce (nor its read-back) on a single process, where check_trigger would make the host wait every step."""
        return processes_where(accelerator, self.signal_name is not None) > 0

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def processes_where(accelerator, holds: bool) -> int:
    """How many processes this holds on. Decisions that change what a process does next (stop, save, raise) are
    taken on this count, so that no process goes on alone and leaves the others waiting for it."""
    if accelerator.num_processes == 1:
        return int(holds)
    count = accelerator.reduce(torch.tensor(float(holds), device=accelerator.device), reduction="sum")
    return int(count)


def weights_are_finite(parts: TrainingParts) -> bool:
    """Whether every trainable weight is finite, agreed by all processes (under FSDP each sees only its own slice)."""
    local = all(
        bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in parts.model.parameters()
        if p.requires_grad
    )
    return processes_where(parts.accelerator, local) == parts.accelerator.num_processes


class Safeguards:
    """The run's safeguards, in one object with three calls (see the module docstring). A context manager: inside it,
    SIGINT and SIGTERM are caught and honoured at the end of the step."""

    def __init__(self, run: PreparedRun, output_dir: Path) -> None:
        self.run, self.output_dir = run, Path(output_dir)
        self.interrupt = InterruptFlag()
        self.nonfinite_streak = 0
        # A checkpoint replaces older ones only once the loss of the step after it is finite (see _diverged).
        self.unconfirmed_checkpoint = False

    def __enter__(self) -> "Safeguards":
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.interrupt.__exit__(*exc)

    def check_step(self, finite: bool, step_index: int) -> None:
        """After optimizer step `step_index` (0-based): stop a run whose loss stayed non-finite, and let a checkpoint
        that a finite step has followed replace the older ones."""
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        if self.nonfinite_streak >= NONFINITE_PATIENCE:
            first = step_index + 2 - self.nonfinite_streak
            # Skipped steps leave the weights alone: those of the step before the streak produced every NaN.
            raise self._diverged(
                f"the training loss was NaN or inf for {NONFINITE_PATIENCE} steps in a row (steps "
                f"{first}-{step_index + 1})",
                first - 1,
            )
        if finite and self.unconfirmed_checkpoint and self.run.accelerator.is_main_process:
            checkpointing.prune_resumable(self.output_dir, self.run.config.keep)
        self.unconfirmed_checkpoint = self.unconfirmed_checkpoint and not finite

    def save_if_due(self, state: TrainingState) -> None:
        """After a step is recorded: a checkpoint on schedule (not during a NaN streak: the weights are suspect), or
        a checkpoint and a stop when a signal asked for one."""
        config, run = self.run.config, self.run
        stop = self.interrupt.requested(run.accelerator)
        due = config.save_every and state.step % config.save_every == 0 and state.step < run.total_steps
        if (due and not self.nonfinite_streak) or stop:
            if not weights_are_finite(run.parts):
                raise self._diverged(f"the weights became NaN or inf at step {state.step}", state.step)
            checkpointing.save_resumable(run.parts, run.identity(), state, self.output_dir)
            self.unconfirmed_checkpoint = True
        if stop:
            raise Interrupted(self.interrupt.signal_name or "SIGTERM", state.step, self.output_dir)

    def check_final(self, state: TrainingState) -> None:
        if not weights_are_finite(self.run.parts):
            raise self._diverged(f"the weights became NaN or inf by step {state.step}", state.step)

    def _diverged(self, what: str, suspect_from_step: int) -> Diverged:
        """Training diverged: checkpoints from `suspect_from_step` on hold the weights that did it; they are set aside
        (renamed), so the latest resumable checkpoint is a good one."""
        accelerator = self.run.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpointing.set_aside_diverged(self.output_dir, suspect_from_step)
            # Read by a study (whatever launched the training), which counts the rate as the worst of its grid.
            atomic_write_json(self.output_dir / DIVERGED_RECORD, {"reason": what, "step": suspect_from_step})
        accelerator.wait_for_everyone()
        checkpoints = resumable_checkpoints(self.output_dir)
        kept = (
            f"the last good checkpoint is {checkpoints[-1]}"
            if checkpoints
            else "no good resumable checkpoint was saved (see --save-every)"
        )
        return Diverged(f"{what}; {kept}; start again with --overwrite and a lower --lr, or --precision fp32/bf16.")
