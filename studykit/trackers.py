"""Experiment trackers, through accelerate's: TensorBoard, Weights & Biases, MLflow (--report-to).

Each gets every line log.jsonl gets (loss, learning rate, gradient norm, tokens/s, dev loss) at its step, and the
resolved config as hyperparameters. A tracker never changes a result, so --report-to is outcome-neutral: changing it
never retrains a study's run. A resumed run continues the same tracker run: TensorBoard writes into the same
directory (hiding what the first start logged after its checkpoint), W&B and MLflow reopen the run whose id the first
start left in the output directory (TRACKER_RUN_FILE).
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any, Optional

from studykit.errors import UserError
from studykit.io import DamagedFile, atomic_write_json, read_json
from studykit.run_dir import TENSORBOARD_DIRECTORY, TRACKER_RUN_FILE

# The import name each tracker needs and the package pip installs it from.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# W&B's project and MLflow's experiment: every run of the kit in one place, each under its output directory's name.
# TensorBoard names its run directory after the run instead (tensorboard/<run name>/).
PROJECT = "studykit"


def check_tracker_installed(report_to: str) -> None:
    """Before any work: a tracker whose package is missing is one sentence, not an import error after the first step."""
    if report_to == "none":
        return
    module, package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"--report-to {report_to} needs the {package} package; `pip install {package}`, or pass --report-to none."
        )


def accelerator_tracking(report_to: str, output_dir: Path) -> dict[str, Any]:
    """The Accelerator's arguments for the tracker. Only TensorBoard writes files of its own, into
    <output-dir>/tensorboard/<run>; MLflow keeps to its tracking URI (MLFLOW_TRACKING_URI, else ./mlruns)."""
    if report_to == "none":
        return {}
    tracking: dict[str, Any] = {"log_with": [report_to]}
    if report_to == "tensorboard":
        tracking["project_dir"] = str(Path(output_dir) / TENSORBOARD_DIRECTORY)
    return tracking


def tracker_run(output_dir: Path, report_to: str, resuming: bool) -> tuple[dict[str, str], bool]:
    """The tracker run of this output directory and whether it is new: a resumed run continues the one its first start
    noted (if it used the same tracker), anything else starts one."""
    path = Path(output_dir) / TRACKER_RUN_FILE
    if resuming and path.exists():
        try:
            saved = read_json(path)
            if saved.get("tracker") == report_to:
                return saved, False
        except DamagedFile:
            pass  # a damaged note: the resumed run starts a tracker run of its own
    return {"tracker": report_to, "run_name": Path(output_dir).name, "run_id": uuid.uuid4().hex[:16]}, True


def init_kwargs(run: dict[str, str], output_dir: Path, resumed_at_step: int) -> dict[str, Any]:
    """What each tracker needs to continue `run`. TensorBoard: events the first start wrote after the step resumed from
    are purged, so every step is drawn once. W&B: its id. MLflow: the id it gave the run (once it has given one)."""
    tracker = run["tracker"]
    if tracker == "tensorboard":
        return {"tensorboard": {"purge_step": resumed_at_step + 1}} if resumed_at_step else {}
    if tracker == "wandb":
        return {"wandb": {"id": run["run_id"], "resume": "allow", "name": run["run_name"], "dir": str(output_dir)}}
    if tracker == "mlflow":
        return {
            "mlflow": {"run_id": run["mlflow_run_id"]} if run.get("mlflow_run_id") else {"run_name": run["run_name"]}
        }
    return {}


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config as every tracker takes hyperparameters: numbers, strings and booleans (a list becomes its JSON text;
    an unset option is left out)."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in config.items()
        if value is not None
    }


class Trackers:
    """The run's tracker, a context manager: `log` every log.jsonl entry; it finishes however the run ends (an
    interrupt, an error), so its files are flushed. With --report-to none it does nothing at all."""

    def __init__(
        self, accelerator, report_to: str, output_dir: Path, config: dict[str, Any], resumed_at_step: int
    ) -> None:
        self.accelerator, self.enabled = accelerator, report_to != "none"
        if not self.enabled:
            return
        output_dir = Path(output_dir)
        run, new = tracker_run(output_dir, report_to, resuming=resumed_at_step > 0)
        project = run["run_name"] if report_to == "tensorboard" else PROJECT
        # Hyperparameters are stored once, when the tracker run starts: MLflow refuses to change a logged parameter, and
        # what a resume may change (the micro-batch split) is in train_config.json.
        accelerator.init_trackers(
            project,
            config=hyperparameters(config) if new else None,
            init_kwargs=init_kwargs(run, output_dir, resumed_at_step),
        )
        if accelerator.is_main_process:
            if report_to == "mlflow":
                run["mlflow_run_id"] = accelerator.get_tracker("mlflow").active_run.info.run_id
            atomic_write_json(output_dir / TRACKER_RUN_FILE, run)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.accelerator.end_training()

    def log(self, entry: dict[str, Any]) -> None:
        """One log.jsonl entry at its step: its numbers (the step itself is the x axis)."""
        if self.enabled:
            scalars = {key: value for key, value in entry.items() if key != "step" and isinstance(value, (int, float))}
            self.accelerator.log(scalars, step=entry["step"])


def tensorboard_run_directory(output_dir: Path) -> Optional[Path]:
    """Where --report-to tensorboard wrote this run's events (None before it has)."""
    directory = Path(output_dir) / TENSORBOARD_DIRECTORY / Path(output_dir).name
    return directory if directory.is_dir() else None
