"""What is current in a study and what must be redone. A step's directory holds a study_inputs.json with the inputs
that produced it (its settings, the data fingerprint, the code version of what it runs); a step whose inputs are
unchanged since it finished is kept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from studykit.config import OUTCOME_NEUTRAL, config_to_dict
from studykit.data import META_FILE
from studykit.io import DamagedFile, atomic_write_json, read_json
from studykit.report import load_per_response
from studykit.run_dir import RUN_RECORD, resumable_checkpoints
from studykit.runtime import stage_code_version
from studykit.study_file import RunSpec, Study

INPUTS_FILE = "study_inputs.json"
# The report's inputs are recorded apart from the evaluation's: both live in the results directory.
REPORT_INPUTS_FILE = "report_inputs.json"
# A run's inputs as it starts (hidden, so the trainer does not take the directory for someone else's files).
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


def _settings(config: Any) -> dict[str, Any]:
    return {key: value for key, value in config_to_dict(config).items() if key not in OUTCOME_NEUTRAL}


def _tiny_model(study: Study) -> Optional[dict[str, Any]]:
    return config_to_dict(study.tiny_model) if study.tiny_model is not None else None


def tiny_model_inputs(study: Study) -> dict[str, Any]:
    return {"tiny_model": _tiny_model(study), "code": stage_code_version("studykit.tiny")}


def prepare_inputs(study: Study) -> dict[str, Any]:
    prepare = {key: value for key, value in config_to_dict(study.prepare).items() if key not in ("output_dir", "overwrite")}
    return {"prepare": prepare, "tiny_model": _tiny_model(study), "code": stage_code_version("studykit.prepare")}


def run_inputs(spec: RunSpec, data_fingerprint: str) -> dict[str, Any]:
    return {"method": spec.method, "config": _settings(spec.config), "data_fingerprint": data_fingerprint,
            "code": stage_code_version("studykit.trainer")}


def eval_inputs(study: Study, data_fingerprint: str) -> dict[str, Any]:
    runs = {spec.name: digest(run_inputs(spec, data_fingerprint)) for spec in study.runs}
    return {"eval": _settings(study.eval), "runs": runs, "data_fingerprint": data_fingerprint, "code": stage_code_version("studykit.evaluate")}


def report_inputs(study: Study, data_fingerprint: str) -> dict[str, Any]:
    return {"eval": digest(eval_inputs(study, data_fingerprint)), "report": config_to_dict(study.report), "study": study.settings,
            "code": stage_code_version("studykit.report")}


def current_fingerprint(study: Study) -> Optional[str]:
    """The processed data's fingerprint if it is current, else None (it will be prepared again)."""
    tiny_ok = study.tiny_model is None or is_current(Path(study.model), tiny_model_inputs(study), "config.json")
    if tiny_ok and is_current(study.data_dir, prepare_inputs(study), META_FILE):
        return read_json(study.data_dir / META_FILE)["fingerprint"]
    return None


def resumable_study_run(run_dir: Path, inputs: dict[str, Any]) -> Optional[Path]:
    """The checkpoint an unfinished run of exactly these inputs left (Ctrl-C, a crash, a lost machine), if any."""
    started = run_dir / STARTED_FILE
    if (run_dir / RUN_RECORD).exists() or not started.exists():
        return None
    try:
        if read_json(started).get("digest") != digest(inputs):
            return None
    except DamagedFile:
        return None
    checkpoints = resumable_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def plan(study: Study) -> list[tuple[str, str]]:
    """(step, what will happen) for every step, without changing anything."""
    steps = []
    if study.tiny_model is not None:
        built = is_current(Path(study.model), tiny_model_inputs(study), "config.json")
        steps.append(("tiny model", "keep" if built else f"build {study.model}"))
    fingerprint = current_fingerprint(study)
    steps.append(("prepare", f"keep (fingerprint {fingerprint})" if fingerprint else f"prepare {study.data_dir}"))
    trains = False
    for spec in study.runs:
        run_dir = Path(spec.config.output_dir)
        inputs = run_inputs(spec, fingerprint) if fingerprint is not None else None
        if inputs is None:
            action = "train, unless the data comes out as before and the run is current"
        elif is_current(run_dir, inputs, "run.json"):
            action = "keep"
        elif (checkpoint := resumable_study_run(run_dir, inputs)) is not None:
            action = f"resume the unfinished run from {checkpoint.name}"
        else:
            action = f"train {spec.method} (lr {spec.config.lr:g}) -> {run_dir}"
        trains = trains or action != "keep"
        steps.append((f"run {spec.name}", action))
    evaluated = not trains and is_current(study.results_dir, eval_inputs(study, fingerprint), "perplexity.json")
    steps.append(("evaluate", "keep" if evaluated else f"score base + {len(study.runs)} runs -> {study.results_dir}"))
    reported = evaluated and is_current(study.results_dir, report_inputs(study, fingerprint), "results.json", REPORT_INPUTS_FILE)
    steps.append(("report", "keep" if reported else "results.json, results.md, figures, samples.md"))
    steps.append(("README", f"rewrite the results block of {study.readme}" if study.readme else "leave alone"))
    return steps
