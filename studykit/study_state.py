"""What is current in a study, what must be redone, and what the learning-rate sweeps chose.

A step's directory holds a study_inputs.json with the inputs that produced it (its settings, the data's fingerprint,
the code version of what it runs); a step whose inputs are unchanged since it finished is kept. A training run
elsewhere (from --print-commands, on a cluster) is recognised by its run.json alone. Every choice reads the dev
split's losses only; the test split is read by evaluation, after every choice is made.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from studykit.batching import resolve_pad_multiple
from studykit.config import OUTCOME_NEUTRAL, config_to_dict
from studykit.data import META_FILE
from studykit.errors import UserError
from studykit.grid_extension import Extension, diverged_rates, edge_side, extension_for, lowest
from studykit.io import DamagedFile, atomic_write_json, read_json
from studykit.response_scores import load_per_response
from studykit.run_dir import DIVERGED_RECORD, RUN_RECORD, load_run_record, resumable_checkpoints
from studykit.run_state import RunRecord
from studykit.runtime import stage_code_version
from studykit.study_file import Study, Training, lr_label
from studykit.study_tables import RunSpec

INPUTS_FILE = "study_inputs.json"
# The report's inputs are recorded apart from the evaluation's: both live in the results directory.
REPORT_INPUTS_FILE = "report_inputs.json"
# A training's inputs as it starts (hidden, so the trainer does not take the directory for someone else's files).
STARTED_FILE = ".study_inputs_started.json"


def digest(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def is_current(directory: Path, inputs: dict[str, Any], required: str, record: str = INPUTS_FILE) -> bool:
    """The directory holds a finished result (`required` exists) made from exactly these inputs. A damaged record or
    result is not current: the step is done again, as after a crash."""
    recorded = directory / record
    if not ((directory / required).exists() and recorded.exists()):
        return False
    try:
        if required.endswith(".json"):
            read_json(directory / required, expect=None)
        if required.endswith(".npz"):
            load_per_response(directory / required)
        return read_json(recorded).get("digest") == digest(inputs)
    except DamagedFile as error:
        print(f"warning: {error.path} is damaged ({error.reason}); the study does that step again.")
        return False


def mark_current(directory: Path, inputs: dict[str, Any], record: str = INPUTS_FILE) -> None:
    atomic_write_json(directory / record, {"digest": digest(inputs), "inputs": inputs})


def outcome_settings(config: Any) -> dict[str, Any]:
    """A config's settings that change what a step computes (not where it reads and writes, or how often it logs)."""
    values = config if isinstance(config, dict) else config_to_dict(config)
    return {key: value for key, value in values.items() if key not in OUTCOME_NEUTRAL}


def _tiny_model(study: Study) -> Optional[dict[str, Any]]:
    return config_to_dict(study.tiny_model) if study.tiny_model is not None else None


def tiny_model_inputs(study: Study) -> dict[str, Any]:
    return {"tiny_model": _tiny_model(study), "code": stage_code_version("studykit.tiny")}


def prepare_inputs(study: Study) -> dict[str, Any]:
    prepare = {
        key: value for key, value in config_to_dict(study.prepare).items() if key not in ("output_dir", "overwrite")
    }
    return {"prepare": prepare, "tiny_model": _tiny_model(study), "code": stage_code_version("studykit.prepare")}


def training_inputs(training: Training, training_fingerprint: str) -> dict[str, Any]:
    """What a training's result depends on: its method and settings, the train and dev splits, the training code."""
    return {
        "method": training.method,
        "config": outcome_settings(training.config),
        "data_fingerprint": training_fingerprint,
        "code": stage_code_version("studykit.trainer"),
    }


def eval_inputs(
    study: Study, data_fingerprint: str, trainings: list[Training], training_fingerprint: str
) -> dict[str, Any]:
    return {
        "eval": outcome_settings(study.eval),
        "trainings": {t.name: digest(training_inputs(t, training_fingerprint)) for t in trainings},
        "data_fingerprint": data_fingerprint,
        "code": stage_code_version("studykit.evaluate"),
    }


def report_inputs(study: Study, evaluation: dict[str, Any], sweeps: dict[str, Any]) -> dict[str, Any]:
    return {
        "eval": digest(evaluation),
        "sweeps": sweeps,
        "report": config_to_dict(study.report),
        "study": study.settings,
        "overrides": study.overrides,
        "seeds": study.seeds,
        "sweep_seeds": study.sweep_seeds,
        "code": stage_code_version("studykit.report"),
    }


def current_data(study: Study) -> Optional[dict[str, Any]]:
    """The processed data's meta.json if it is current, else None (it will be prepared again)."""
    tiny_ok = study.tiny_model is None or is_current(Path(study.model), tiny_model_inputs(study), "config.json")
    if tiny_ok and is_current(study.data_dir, prepare_inputs(study), META_FILE):
        return read_json(study.data_dir / META_FILE)
    return None


def training_is_current(training: Training, training_fingerprint: str, adopt: bool = True) -> bool:
    """Finished from these inputs: recorded so by the study runner, or (trained by a printed command) by its run.json,
    which `adopt` then records as the runner would (a dry run records nothing)."""
    run_dir, inputs = Path(training.config.output_dir), training_inputs(training, training_fingerprint)
    if is_current(run_dir, inputs, RUN_RECORD):
        return True
    if not (run_dir / RUN_RECORD).exists():
        return False
    try:
        record = load_run_record(run_dir)
    except UserError:
        return False
    # The trainer records --pad-to-multiple-of as resolved on its device; the study's config may leave it to that
    # default.
    expected = dict(inputs["config"])
    if expected.get("pad_to_multiple_of") is None:
        expected["pad_to_multiple_of"] = resolve_pad_multiple(None, record.device.split(":")[0])
    matches = (
        record.method == training.method
        and outcome_settings(record.config) == expected
        and record.training_data_fingerprint == training_fingerprint
        and record.train_code_version == inputs["code"]
    )
    if matches and adopt:
        mark_current(run_dir, inputs)
    return matches


def resumable_training(training: Training, training_fingerprint: str) -> Optional[Path]:
    """The checkpoint an unfinished training of exactly these inputs left (Ctrl-C, a crash, a lost machine), if any."""
    run_dir = Path(training.config.output_dir)
    started = run_dir / STARTED_FILE
    if (run_dir / RUN_RECORD).exists() or not started.exists():
        return None
    try:
        if read_json(started).get("digest") != digest(training_inputs(training, training_fingerprint)):
            return None
    except DamagedFile:
        return None
    checkpoints = resumable_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


@dataclass
class SweepResult:
    """What a run's learning-rate sweep found: the mean final dev loss at each rate of its grid and of the rates added
    beyond its ends (None: not trained yet, or every sweep seed diverged), and the rate with the lowest. `at_edge`: the
    choice lies at an end of the widened grid because the bound on extensions stopped the search there."""

    run: str
    learning_rates: list[float]
    dev_losses: dict[float, Optional[float]]
    pending: list[str]
    chosen_lr: Optional[float]
    at_edge: bool
    added: list[Extension] = field(default_factory=list)
    grid_extensions: int = 0  # the bound: rates the grid may add at most
    diverged: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "learning_rates": self.learning_rates,
            # A diverged rate's loss is recorded as null (JSON has no infinity) and listed under "diverged".
            "dev_loss": {
                repr(lr): (loss if loss is not None and math.isfinite(loss) else None)
                for lr, loss in self.dev_losses.items()
            },
            "dev_perplexity": {
                repr(lr): (math.exp(loss) if loss is not None and math.isfinite(loss) else None)
                for lr, loss in self.dev_losses.items()
            },
            "chosen_lr": self.chosen_lr,
            "at_edge": self.at_edge,
            "added": [extension.to_dict() for extension in self.added],
            "grid_extensions": self.grid_extensions,
            "diverged": self.diverged,
        }


def sweep_result(study: Study, spec: RunSpec, training_fingerprint: Optional[str], adopt: bool = True) -> SweepResult:
    """Choose the run's rate from its sweep trainings' final dev losses (mean over the sweep seeds). Only finished,
    current trainings count (a diverged one as the worst rate); while any is pending, nothing is chosen. A choice at
    an end of the grid adds the next rate beyond it (grid_extension.py), up to the study's grid_extensions, and is made
    again once that rate has trained: a resumed study finds the added rates' trainings finished and keeps them. A run
    without a grid has its one rate."""
    grid, added = list(spec.learning_rates), []
    while True:
        dev_losses, pending = sweep_losses(study, spec, grid, training_fingerprint, adopt)
        result = SweepResult(
            spec.name, grid, dev_losses, pending, None, False, added, study.grid_extensions, diverged_rates(dev_losses)
        )
        if not spec.sweeps:
            result.chosen_lr = grid[0]
            return result
        if pending:
            return result
        chosen = lowest(dev_losses)
        if chosen is None:
            raise UserError(
                f"every learning rate of run '{spec.name}' ({grid}) ended with a non-finite dev loss; "
                f"lower the grid in {study.source}."
            )
        extension = extension_for(grid, chosen, len(added), study.grid_extensions)
        if extension is None:
            result.chosen_lr, result.at_edge = chosen, edge_side(grid, chosen) is not None
            return result
        grid, added = sorted(grid + [extension.lr]), added + [extension]


def sweep_losses(
    study: Study, spec: RunSpec, grid: list[float], training_fingerprint: Optional[str], adopt: bool
) -> tuple[dict[float, Optional[float]], list[str]]:
    """The mean final dev loss at each rate over the sweep seeds (inf where a training diverged, None where none
    finished with a finite loss), and the sweep trainings not finished yet."""
    losses: dict[float, list[float]] = {lr: [] for lr in grid}
    pending = []
    for training in study.sweep_trainings(spec, grid):
        record = finished_record(training, training_fingerprint, adopt)
        if record is not None:
            if record.final_dev_loss is not None and math.isfinite(record.final_dev_loss):
                losses[training.lr].append(record.final_dev_loss)
        elif training_fingerprint is not None and training_diverged(training, training_fingerprint):
            losses[training.lr].append(math.inf)
        else:
            pending.append(training.name)
    return {lr: (sum(values) / len(values) if values else None) for lr, values in losses.items()}, pending


def training_diverged(training: Training, training_fingerprint: str) -> bool:
    """The training of exactly these inputs stopped because it diverged (its directory holds the trainer's record of
    that, and the inputs it started from are these): it is done, as the worst rate of its grid."""
    run_dir = Path(training.config.output_dir)
    if (run_dir / RUN_RECORD).exists() or not (run_dir / DIVERGED_RECORD).exists():
        return False
    try:
        return read_json(run_dir / STARTED_FILE).get("digest") == digest(
            training_inputs(training, training_fingerprint)
        )
    except (DamagedFile, FileNotFoundError):
        return False


def finished_record(training: Training, training_fingerprint: Optional[str], adopt: bool = True) -> Optional[RunRecord]:
    if training_fingerprint is None or not training_is_current(training, training_fingerprint, adopt):
        return None
    return load_run_record(Path(training.config.output_dir))


def plan(study: Study) -> list[tuple[str, str]]:
    """(step, what will happen) for every step, without changing anything."""
    steps = []
    if study.tiny_model is not None:
        built = is_current(Path(study.model), tiny_model_inputs(study), "config.json")
        steps.append(("tiny model", "keep" if built else f"build {study.model}"))
    meta = current_data(study)
    fingerprint = meta["training_fingerprint"] if meta else None
    steps.append(("prepare", f"keep (fingerprint {meta['fingerprint']})" if meta else f"prepare {study.data_dir}"))
    for spec in study.runs:
        sweep = sweep_result(study, spec, fingerprint, adopt=False)
        trainings = (
            study.sweep_trainings(spec, sweep.learning_rates)
            if sweep.chosen_lr is None
            else study.replicate_trainings(spec, sweep.chosen_lr)
        )
        actions = [training_action(training, fingerprint) for training in trainings]  # records nothing
        to_train = [training.name for training, action in zip(trainings, actions) if action != "keep"]
        label = f"run {spec.name}"
        if sweep.chosen_lr is None:
            later = len(study.seeds) - len(study.sweep_seeds)
            left = study.grid_extensions - len(sweep.added)
            widen = (
                f"; a choice at an end of the grid adds the next rate beyond it, up to {left} more time(s) "
                f"({left * len(study.sweep_seeds)} training(s) at most)"
                if left > 0
                else ""
            )
            steps.append(
                (
                    label,
                    f"sweep lr {[lr_label(lr) for lr in sweep.learning_rates]} with seed(s) {study.sweep_seeds}: train "
                    f"{len(to_train)} of {len(trainings)}{widen}; then {later} more at the rate with the lowest dev "
                    "loss",
                )
            )
        else:
            widened = f", {len(sweep.added)} rate(s) added beyond the grid" if sweep.added else ""
            chosen = f"lr {sweep.chosen_lr:g}" + (
                f" (chosen on dev{widened}; at the grid's edge)"
                if sweep.at_edge
                else f" (chosen on dev{widened})"
                if spec.sweeps
                else ""
            )
            steps.append(
                (
                    label,
                    f"{chosen}, seeds {study.seeds}: "
                    + (f"train {len(to_train)} of {len(trainings)}" if to_train else "keep"),
                )
            )
        for training, action in zip(trainings, actions):
            if action != "keep":
                steps.append((f"  {training.name}", action))
    steps.append(
        ("evaluate", f"score base + the chosen trainings on the test split -> {study.results_dir} (unless current)")
    )
    steps.append(("report", "results.json, results.md, figures, samples.md (unless current)"))
    if study.analysis.enabled:
        steps.append(
            (
                "analyze",
                "verdict, gap by token bucket, weight change, intruder mitigation -> analysis.json (unless current)",
            )
        )
    steps.append(("README", f"rewrite the results block of {study.readme}" if study.readme else "leave alone"))
    return steps


def training_action(training: Training, fingerprint: Optional[str]) -> str:
    if fingerprint is None:
        return "train, unless the data comes out as before and the training is current"
    if training_is_current(training, fingerprint, adopt=False):
        return "keep"
    checkpoint = resumable_training(training, fingerprint)
    return (
        f"resume the unfinished training from {checkpoint.name}"
        if checkpoint
        else f"train {training.method} -> {training.config.output_dir}"
    )
