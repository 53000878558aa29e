"""Where a study's trainings run: one at a time, each in a process of its own (the default); side by side, one per
GPU (--gpus); each under `accelerate launch` (--launcher accelerate); or nowhere, printed as commands for a cluster
scheduler (--print-commands), whose results a later run of the study gathers.

The trainings of one phase (the learning-rate sweep, then the chosen rate's other seeds) are independent, so their
order and placement change nothing but the time they take.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from studykit.checkpointing import UnusableCheckpoint
from studykit.config import TrainConfig, command_line
from studykit.errors import UserError, first_line
from studykit.methods import METHODS
from studykit.runtime import REPO_ROOT
from studykit.safeguards import Diverged, Interrupted
from studykit.study_config import StudyConfig
from studykit.study_file import Training
from studykit.study_state import (
    STARTED_FILE,
    mark_current,
    resumable_training,
    training_diverged,
    training_inputs,
)

# How often the GPU scheduler looks for a finished training.
POLL_SECONDS = 0.5


def train_run(config: TrainConfig) -> dict[str, Any]:
    """One training run through the shared trainer, exactly as training/train_*.py would run it."""
    from studykit.trainer import train

    return train(config).to_dict()


def training_process_context():
    """forkserver where there is one: every training still gets a process of its own, forked from a server that
    imported torch and transformers once, so a training pays no import time; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["studykit.trainer"])
    return context


def train_in_fresh_process(training: Training, config: TrainConfig) -> None:
    """Each training in its own process, so its peak memory (the process's RSS on a CPU) and its state are its own,
    not the high-water mark of the trainings before it."""
    with ProcessPoolExecutor(max_workers=1, mp_context=training_process_context()) as pool:
        try:
            pool.submit(train_run, config).result()
        except Interrupted as stopped:
            # The trainer's advice (--resume) is for its own command; the study resumes by itself.
            error = UserError(
                f"{training.name}: training stopped by {stopped.signal_name} after step {stopped.step} and saved a "
                "resumable checkpoint; run the same study command again to continue it."
            )
            error.exit_code = stopped.exit_code
            raise error from None


def how_to_start(training: Training, training_fingerprint: str) -> tuple[TrainConfig, Optional[Path]]:
    """The config to train with: --resume from an unfinished training of the same inputs, else --overwrite (whatever
    the directory held is replaced, never mixed with)."""
    checkpoint = resumable_training(training, training_fingerprint)
    if checkpoint is not None:
        return dataclasses.replace(training.config, resume=True, overwrite=False), checkpoint
    return dataclasses.replace(training.config, overwrite=True, resume=False), None


def mark_started(training: Training, training_fingerprint: str) -> None:
    """Written before the first step, so an interrupted training can later be recognised as this one and resumed."""
    run_dir = Path(training.config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_current(run_dir, training_inputs(training, training_fingerprint), STARTED_FILE)


def training_command(config: TrainConfig, launcher: str = "local", num_processes: int = 1) -> list[str]:
    """The training as one command line, runnable from any directory."""
    script = str(REPO_ROOT / METHODS[config.method].script)
    if launcher == "accelerate":
        return ["accelerate", "launch", "--num_processes", str(num_processes), script, *command_line(config)]
    return [sys.executable, script, *command_line(config)]


def visible_gpus(requested: Optional[str]) -> list[str]:
    """The CUDA device ids --gpus names ('all': every visible one)."""
    if requested is None:
        return []
    if requested.strip().lower() != "all":
        ids = [part.strip() for part in requested.split(",") if part.strip()]
        if not ids or not all(part.isdigit() for part in ids):
            raise UserError(f"--gpus takes CUDA device ids such as 0,1 or 'all' (got {requested!r}).")
        return ids
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise UserError("--gpus all found no CUDA GPU; leave --gpus out to train one training at a time.")
    return [str(index) for index in range(count)]


@dataclasses.dataclass
class Launched:
    training: Training
    device: str
    process: Any  # subprocess.Popen, or a stand-in with poll() and the returncode/stderr a test gives it


class DeviceScheduler:
    """Runs trainings side by side, one per device: a device takes the next pending training as soon as its own ends.
    `start(training, device)` launches one and returns its process."""

    def __init__(
        self, devices: Sequence[str], start: Callable[[Training, str], Any], poll_seconds: float = POLL_SECONDS
    ) -> None:
        if not devices:
            raise ValueError("the scheduler needs at least one device")
        self.devices, self.start, self.poll_seconds = list(devices), start, poll_seconds
        self.assignments: list[tuple[str, str]] = []  # (training, device), in launch order

    def run(self, trainings: Sequence[Training]) -> list[tuple[Training, int]]:
        """Every training, to the end; returns those that failed, with their exit status."""
        pending, running, failed = list(trainings), [], []
        free = list(self.devices)
        while pending or running:
            while pending and free:
                device = free.pop(0)
                training = pending.pop(0)
                self.assignments.append((training.name, device))
                running.append(Launched(training, device, self.start(training, device)))
            time.sleep(self.poll_seconds if running else 0)
            for launched in [launched for launched in running if launched.process.poll() is not None]:
                running.remove(launched)
                free.append(launched.device)
                if launched.process.returncode != 0:
                    failed.append((launched.training, launched.process.returncode))
        return failed


def run_trainings(
    trainings: Sequence[Training],
    training_fingerprint: str,
    study_config: StudyConfig,
    divergence_allowed: bool = False,
) -> dict[str, bool]:
    """Train every given training where --gpus / --launcher say; returns, for each, whether it was resumed. With
    `divergence_allowed` (a learning-rate sweep) a training that diverges is reported and the others go on: the study
    counts its rate as the worst."""
    devices = visible_gpus(study_config.gpus)
    if devices or study_config.launcher == "accelerate":
        return run_as_commands(trainings, training_fingerprint, study_config, devices, divergence_allowed)
    resumed = {}
    for training in trainings:
        config, checkpoint = how_to_start(training, training_fingerprint)
        print(
            f"\n=== training {training.name}"
            + (f": resuming the unfinished training from {checkpoint.name}" if checkpoint else "")
            + " ==="
        )
        if checkpoint is None:
            mark_started(training, training_fingerprint)
        try:
            train_in_fresh_process(training, config)
        except Diverged as error:
            if not divergence_allowed:
                raise UserError(f"{training.name}: {error}") from None
            print(f"warning: {training.name} diverged ({first_line(error)}); its rate counts as the worst of the grid.")
        except UnusableCheckpoint as error:
            print(f"warning: {training.name} cannot be resumed ({error}); training it again from the start.")
            mark_started(training, training_fingerprint)
            train_in_fresh_process(training, dataclasses.replace(training.config, overwrite=True, resume=False))
            checkpoint = None
        resumed[training.name] = checkpoint is not None
    return resumed


def run_as_commands(
    trainings: Sequence[Training],
    training_fingerprint: str,
    study_config: StudyConfig,
    devices: list[str],
    divergence_allowed: bool = False,
) -> dict[str, bool]:
    """Each training as its own command: side by side on `devices` (one each), or one after the other under accelerate
    launch with all the devices. A failed training is named with the last line it printed; one that diverged, with
    `divergence_allowed`, is not a failure."""
    logs = Path(trainings[0].config.output_dir).parent / ".logs" if trainings else None

    resumed = {}

    def start(training: Training, device: Optional[str]):
        config, checkpoint = how_to_start(training, training_fingerprint)
        resumed[training.name] = checkpoint is not None
        if checkpoint is None:
            mark_started(training, training_fingerprint)
        command = training_command(config, study_config.launcher, study_config.num_processes)
        environment = dict(os.environ)
        if device is not None:
            environment["CUDA_VISIBLE_DEVICES"] = device
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{training.name}.log", "w", encoding="utf-8")
        print(
            f"=== training {training.name}" + (f" on GPU {device}" if device is not None else "") + f"; log: {log.name}"
        )
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO_ROOT)

    if devices and study_config.launcher != "accelerate":
        failed = DeviceScheduler(devices, start).run(trainings)
    else:
        all_devices = ",".join(devices) if devices else None
        failed = [(training, code) for training in trainings if (code := start(training, all_devices).wait()) != 0]
    if divergence_allowed:
        failed = [(t, code) for t, code in failed if not training_diverged(t, training_fingerprint)]
    if failed:
        training, code = failed[0]
        raise UserError(
            f"{len(failed)} training(s) failed, first {training.name} (exit status {code}: "
            f"{last_line(logs / f'{training.name}.log')}); fix the cause and run the same study command again."
        )
    return resumed


def last_line(path: Path) -> str:
    lines = (
        [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        if path.exists()
        else []
    )
    return lines[-1].strip() if lines else "no output"


def print_commands(trainings: Sequence[Training], training_fingerprint: str, study_config: StudyConfig) -> None:
    """One command line per pending training, to run anywhere that sees this study directory (a cluster's array job);
    a later `run_study.py` finds the finished ones by their run.json and goes on from there."""
    print(f"\n# {len(trainings)} pending training(s); run each command below, then the same study command again.")
    for training in trainings:
        config, _ = how_to_start(training, training_fingerprint)
        print(shlex.join(training_command(config, study_config.launcher, study_config.num_processes)))
