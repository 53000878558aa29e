"""The whole controlled study from one TOML file: prepare -> every training run -> evaluation -> report.

A step whose inputs (its settings, the data fingerprint and the code version) are unchanged since it last finished
is kept, not redone: each step's directory holds a study_inputs.json with the inputs that produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import multiprocessing
import os
import re
import tomllib
import zipfile
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit import locks, report
from studykit.checkpointing import UnusableCheckpoint
from studykit.methods import METHODS
from studykit.run_dir import RUN_LOG, RUN_RECORD, load_run_record, read_run_log, resumable_checkpoints
from studykit.safeguards import Interrupted
from studykit.config import (OUTCOME_NEUTRAL, EvalConfig, LoraTrainConfig, PrepareConfig, StudyConfig, TrainConfig, build_parser,
                             config_to_dict, print_config, unwrap_optional)
from studykit.data import META_FILE
from studykit.errors import UserError, first_line
from studykit.io import DamagedFile, MIB, atomic_write_json, atomic_write_text, disk_space_for, read_json
from studykit.runtime import REPO_ROOT, code_version

STUDIES_DIR = REPO_ROOT / "studies"
INPUTS_FILE = "study_inputs.json"
# The report's inputs are recorded apart from the evaluation's: both live in the results directory.
REPORT_INPUTS_FILE = "report_inputs.json"
# A run's inputs as it starts (hidden, so the trainer does not take the directory for someone else's files).
STARTED_FILE = ".study_inputs_started.json"
# Set by the runner for every run, never by the study file: where things go and how an old run is replaced.
RUNNER_OWNED = {"output_dir", "data_dir", "resume", "overwrite"}
STUDY_TABLES = {"study", "tiny_model", "data", "budget", "eval", "report", "runs"}
STUDY_HEADER_TYPES = {"name": str, "output_dir": str, "readme": str}
# Every run of a study trains and is scored on one base model and one tokenization: these are set once, in [budget].
SHARED_BY_ALL_RUNS = {"model", "tokenizer"}
TINY_MODEL_DEFAULTS = {"data_file": "data/sample/oasst_sample.jsonl", "vocab_size": 512, "n_layer": 2, "n_embd": 64}
REPORT_DEFAULTS = {"bootstrap_resamples": 2000, "bootstrap_seed": 0, "sample_prompts": 4, "sample_new_tokens": 40}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# results.json, results.md, samples.md and the figures, with room to spare.
REPORT_BYTES = 2 * MIB


@dataclasses.dataclass
class RunSpec:
    name: str
    method: str
    config: TrainConfig


@dataclasses.dataclass
class Study:
    name: str
    source: Path
    settings: dict[str, Any]
    output_dir: Path
    model: str
    tiny_model: Optional[dict[str, Any]]
    prepare: PrepareConfig
    runs: list[RunSpec]
    eval: EvalConfig
    report: dict[str, Any]
    readme: Optional[Path]

    @property
    def data_dir(self) -> Path:
        return self.output_dir / "processed"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def results_dir(self) -> Path:
        return self.output_dir / "results"


# ---------------------------------------------------------------------------------------------------------
# Reading a study file
# ---------------------------------------------------------------------------------------------------------


def study_path(config: StudyConfig) -> Path:
    if config.config:
        path = Path(config.config)
        if not path.is_file():
            raise UserError(f"study file {path} does not exist; pass a TOML file with --config, or a --preset.")
        return path
    path = STUDIES_DIR / f"{config.preset}.toml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.toml")))
        raise UserError(f"there is no preset '{config.preset}'; choose one of {available}, or pass --config PATH.")
    return path


def repo_path(value: str) -> Path:
    """Paths inside a study file are relative to the repository root, so a preset runs from any directory."""
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def _table(settings: dict[str, Any], key: str, source: Path) -> dict[str, Any]:
    value = settings.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"[{key}] in {source} must be a table of settings; see studies/default.toml.")
    return dict(value)


def _field_types(config_cls: type) -> dict[str, tuple[Any, Optional[Sequence[str]]]]:
    """Each field's type and, where its flag has them, its choices."""
    hints = typing.get_type_hints(config_cls)
    return {field.name: (hints[field.name], field.metadata.get("choices")) for field in dataclasses.fields(config_cls)}


def _fits(value: Any, annotation: Any) -> bool:
    """TOML has no null, so Optional[X] takes an X; an integer is a fine float, but true is no number."""
    annotation, _ = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(_fits(item, typing.get_args(annotation)[0]) for item in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    annotation, _ = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _value_kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "a whole number", float: "a decimal number", str: "a string", list: "a list", dict: "a table"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _how_to_write(key: str, value: Any, annotation: Any) -> str:
    annotation, _ = unwrap_optional(annotation)
    if typing.get_origin(annotation) is list and _fits(value, typing.get_args(annotation)[0]):
        return f"put it in brackets: {key} = {json.dumps([value])}"
    if isinstance(value, str) and annotation in (bool, int, float):
        return f"write {key} as {_type_name(annotation)}, without quotes"
    return f"write {key} as {_type_name(annotation)}"


def check_settings(values: dict[str, Any], types: dict[str, tuple[Any, Optional[Sequence[str]]]], where: str, source: Path,
                   accepted: str) -> None:
    """Every key of a study-file table is one its stage knows, and every value has that setting's type (and is one of
    its choices): TOML values reach the configs unconverted, where a string lr would fail deep inside training."""
    unknown = sorted(set(values) - set(types))
    if unknown:
        meant = [guess for key in unknown for guess in difflib.get_close_matches(key, list(types), n=1)]
        raise UserError(f"{where} in {source} has unknown setting(s) {unknown}" + (f" (did you mean {meant}?)" if meant else "")
                        + f"; use {accepted}.")
    for key, value in values.items():
        annotation, choices = types[key]
        shown = json.dumps(value, default=str)
        if not _fits(value, annotation):
            raise UserError(f"{where} in {source} sets {key} = {shown}, {_value_kind(value)}, but {key} takes {_type_name(annotation)}; "
                            f"{_how_to_write(key, value, annotation)}.")
        if choices and value not in choices:
            raise UserError(f"{where} in {source} sets {key} = {shown}; use one of {list(choices)}.")


def check_stage_settings(values: dict[str, Any], config_cls: type, where: str, source: Path, accepted: Optional[str] = None) -> None:
    check_settings(values, _field_types(config_cls), where, source,
                   accepted or f"fields of {config_cls.__name__} (the stage's flags with _ for -)")


def _build(config_cls: type, values: dict[str, Any], where: str, source: Path):
    """A stage config from study-file values already checked by check_settings, validated as its script would; the
    stage names its flag, so the error is told where in the study file that setting is."""
    config = config_cls(**values)
    try:
        config.validate()
    except UserError as error:
        raise UserError(f"{where} in {source}: {error}") from None
    return config


def _reject_runner_owned(values: dict[str, Any], owned: set[str], where: str, source: Path) -> None:
    clashing = sorted(owned & set(values))
    if clashing:
        raise UserError(f"{where} in {source} sets {clashing}, which the runner sets for every run; remove them "
                        "(use [study] output_dir or --output-dir to move the study).")


def _types_of_defaults(defaults: dict[str, Any]) -> dict[str, tuple[Any, None]]:
    return {key: (type(value), None) for key, value in defaults.items()}


def load_study(path: Path, output_dir: Optional[str] = None, readme: Optional[str] = None) -> Study:
    """Stage configs for every step of the study: [data] -> prepare, [budget] + [[runs]] -> training, [eval].
    The whole file is checked here, before any step runs: a mistake in the last run must not surface after the
    first runs have trained."""
    try:
        settings = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML ({error}); fix the file.") from None
    unknown = sorted(set(settings) - STUDY_TABLES)
    if unknown:
        raise UserError(f"{path} has unknown table(s) {unknown}; a study file has {sorted(STUDY_TABLES)}.")
    header = _table(settings, "study", path)
    check_settings(header, {key: (kind, None) for key, kind in STUDY_HEADER_TYPES.items()}, "[study]", path,
                   f"the keys {sorted(STUDY_HEADER_TYPES)}")
    name = header.get("name", Path(path).stem)
    root = Path(output_dir) if output_dir else repo_path(header.get("output_dir", f"runs/{name}"))
    readme_path = None if readme == "" else Path(readme) if readme else repo_path(header["readme"]) if header.get("readme") else None

    budget = _table(settings, "budget", path)
    # LoRA settings may sit in [budget] when every run is a LoRA run; _run_spec refuses them for a full run.
    check_stage_settings(budget, LoraTrainConfig, "[budget]", path, "fields of TrainConfig or LoraTrainConfig (the training flags with _ for -)")
    _reject_runner_owned(budget, RUNNER_OWNED, "[budget]", path)
    tiny_model = None
    if "tiny_model" in settings:
        tiny_table = _table(settings, "tiny_model", path)
        check_settings(tiny_table, _types_of_defaults(TINY_MODEL_DEFAULTS), "[tiny_model]", path, f"the keys {sorted(TINY_MODEL_DEFAULTS)}")
        tiny_model = {**TINY_MODEL_DEFAULTS, **tiny_table}
        tiny_model["data_file"] = str(repo_path(tiny_model["data_file"]))
        if "model" in budget:
            raise UserError(f"{path} has both [tiny_model] and [budget] model; keep one of them.")
        budget["model"] = str(root / "tiny-gpt2")
    model = budget.get("model", TrainConfig.model)
    tokenizer = budget.get("tokenizer") or model

    data = _table(settings, "data", path)
    _reject_runner_owned(data, {"output_dir", "tokenizer", "overwrite"}, "[data]", path)
    check_stage_settings(data, PrepareConfig, "[data]", path)
    if data.get("data_file"):
        data["data_file"] = str(repo_path(data["data_file"]))
    # The runner decides whether the data is current; a dataset it prepares replaces the one made from older inputs.
    prepare = _build(PrepareConfig, {**data, "tokenizer": tokenizer, "output_dir": str(root / "processed"), "overwrite": True},
                     "[data]", path)

    entries = settings.get("runs", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"runs in {path} must be [[runs]] tables, one per run; see studies/default.toml.")
    runs = [_run_spec(entry, budget, root, path) for entry in entries]
    if not runs:
        raise UserError(f"{path} lists no [[runs]]; add at least one run (see studies/default.toml).")
    names = [spec.name for spec in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path} names a run twice ({names}); give every [[runs]] entry its own name.")

    evaluation = _table(settings, "eval", path)
    _reject_runner_owned(evaluation, {"model", "tokenizer", "data_dir", "checkpoints", "output_dir"}, "[eval]", path)
    check_stage_settings(evaluation, EvalConfig, "[eval]", path)
    if evaluation.get("extra_eval") and repo_path(evaluation["extra_eval"]).is_file():
        evaluation["extra_eval"] = str(repo_path(evaluation["extra_eval"]))
    eval_config = _build(EvalConfig, {**evaluation, "model": model, "tokenizer": budget.get("tokenizer"), "data_dir": str(root / "processed"),
                                      "checkpoints": str(root / "checkpoints"), "output_dir": str(root / "results")}, "[eval]", path)
    report_settings = _table(settings, "report", path)
    check_settings(report_settings, _types_of_defaults(REPORT_DEFAULTS), "[report]", path, f"the keys {sorted(REPORT_DEFAULTS)}")
    return Study(name, Path(path), settings, root, model, tiny_model, prepare, runs, eval_config,
                 {**REPORT_DEFAULTS, **report_settings}, readme_path)


def _run_spec(entry: dict[str, Any], budget: dict[str, Any], root: Path, source: Path) -> RunSpec:
    entry = dict(entry)
    name, method = str(entry.pop("name", "")), entry.pop("method", None)
    if not RUN_NAME.fullmatch(name):
        raise UserError(f"a [[runs]] entry in {source} has no usable name ('{name}'); give it a name of letters, digits, _ . -.")
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"run '{name}' in {source} has method {method!r}; use one of {sorted(METHODS)}.")
    config_cls = METHODS[method].config_class
    shared = sorted(SHARED_BY_ALL_RUNS & set(entry))
    if shared:
        raise UserError(f"run '{name}' in {source} sets {shared}, but the runs of a study are compared on one base model and one "
                        f"tokenization; set {' and '.join(shared)} once for the whole study in [budget] (or build a [tiny_model]).")
    _reject_runner_owned(entry, RUNNER_OWNED, f"run '{name}'", source)
    check_stage_settings(entry, config_cls, f"run '{name}'", source)
    not_taken = sorted(set(budget) - set(_field_types(config_cls)))
    if not_taken:
        raise UserError(f"[budget] in {source} sets {not_taken}, which run '{name}' (method '{method}') does not take; "
                        "set them in the [[runs]] entries that use them.")
    values = {**budget, **entry, "output_dir": str(root / "checkpoints" / name), "data_dir": str(root / "processed")}
    return RunSpec(name, method, _build(config_cls, values, f"run '{name}'", source))


# ---------------------------------------------------------------------------------------------------------
# What is current, what must be redone
# ---------------------------------------------------------------------------------------------------------


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


def tiny_model_inputs(study: Study) -> dict[str, Any]:
    return {"tiny_model": study.tiny_model, "code": code_version()}


def prepare_inputs(study: Study) -> dict[str, Any]:
    prepare = {key: value for key, value in config_to_dict(study.prepare).items() if key not in ("output_dir", "overwrite")}
    return {"prepare": prepare, "tiny_model": study.tiny_model, "code": code_version()}


def run_inputs(spec: RunSpec, data_fingerprint: str) -> dict[str, Any]:
    return {"method": spec.method, "config": _settings(spec.config), "data_fingerprint": data_fingerprint, "code": code_version()}


def eval_inputs(study: Study, data_fingerprint: str) -> dict[str, Any]:
    runs = {spec.name: digest(run_inputs(spec, data_fingerprint)) for spec in study.runs}
    return {"eval": _settings(study.eval), "runs": runs, "data_fingerprint": data_fingerprint, "code": code_version()}


def report_inputs(study: Study, data_fingerprint: str) -> dict[str, Any]:
    return {"eval": digest(eval_inputs(study, data_fingerprint)), "report": study.report, "study": study.settings}


def current_fingerprint(study: Study) -> Optional[str]:
    """The processed data's fingerprint if it is current, else None (it will be prepared again)."""
    tiny_ok = study.tiny_model is None or is_current(Path(study.model), tiny_model_inputs(study), "config.json")
    if tiny_ok and is_current(study.data_dir, prepare_inputs(study), META_FILE):
        return read_json(study.data_dir / META_FILE)["fingerprint"]
    return None


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


# ---------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------


def train_run(config: TrainConfig) -> dict[str, Any]:
    """One training run through the shared trainer, exactly as training/train_*.py would run it."""
    from studykit.trainer import train

    return train(config).to_dict()


def train_in_fresh_process(spec: RunSpec) -> dict[str, Any]:
    """Each run trains in its own process, so its peak memory (the process's RSS on a CPU) and its state are its
    own, not the high-water mark of the runs before it."""
    with ProcessPoolExecutor(max_workers=1, mp_context=training_process_context()) as pool:
        try:
            return pool.submit(train_run, spec.config).result()
        except Interrupted as stopped:
            # The trainer's advice (--resume) is for its own command; the study resumes by itself.
            error = UserError(f"{spec.name}: training stopped by {stopped.signal_name} after step {stopped.step} and saved a "
                              "resumable checkpoint; run the same study command again to continue it.")
            error.exit_code = stopped.exit_code
            raise error from None


def training_process_context():
    """forkserver where there is one: every run still gets a process of its own, forked from a server that imported
    torch and transformers once, so a run pays no import time; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["studykit.trainer"])
    return context


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


def train_study_run(spec: RunSpec, inputs: dict[str, Any], done: dict[str, Any]) -> None:
    """Train one run: continue an unfinished one made from the same inputs, else start afresh (replacing whatever
    the directory held, never mixing two runs)."""
    run_dir = Path(spec.config.output_dir)
    checkpoint = resumable_study_run(run_dir, inputs)
    if checkpoint is not None:
        print(f"\n=== training {spec.name}: resuming the unfinished run from {checkpoint.name} ===")
        try:
            train_in_fresh_process(dataclasses.replace(spec, config=dataclasses.replace(spec.config, resume=True)))
            done["resumed"].append(spec.name)
        except UnusableCheckpoint as error:
            print(f"warning: {spec.name} cannot be resumed ({error}); training it again from the start.")
            checkpoint = None
    if checkpoint is None:
        print(f"\n=== training {spec.name} ===")
        run_dir.mkdir(parents=True, exist_ok=True)
        # Written before the first step, so an interrupted run can later be recognised as this one and resumed.
        mark_current(run_dir, inputs, STARTED_FILE)
        train_in_fresh_process(dataclasses.replace(spec, config=dataclasses.replace(spec.config, overwrite=True)))
    mark_current(run_dir, inputs)
    done["trained"].append(spec.name)


def build_tiny_model(study: Study) -> None:
    from studykit.tiny import build_tiny_gpt2, sample_texts, train_byte_level_tokenizer

    spec = study.tiny_model
    tokenizer = train_byte_level_tokenizer(sample_texts(Path(spec["data_file"])), spec["vocab_size"])
    build_tiny_gpt2(Path(study.model), tokenizer, n_layer=spec["n_layer"], n_embd=spec["n_embd"])
    mark_current(Path(study.model), tiny_model_inputs(study))
    print(f"built tiny model {study.model}")


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run every step that is not current; return what was done (and what was kept)."""
    print_config(config)
    study = load_study(study_path(config), config.output_dir, config.readme)
    print(f"study '{study.name}' from {study.source} -> {study.output_dir} (code version {code_version()})")
    steps = plan(study)
    for step, action in steps:
        print(f"  {step:<24} {action}")
    done: dict[str, Any] = {"study": study.name, "output_dir": str(study.output_dir), "tiny_model_built": False, "prepared": False,
                            "trained": [], "resumed": [], "kept": [], "evaluated": False, "reported": False, "readme": None, "dry_run": config.dry_run}
    if config.dry_run:
        return done
    with locks.exclusive(study.output_dir, "--output-dir"):
        return run_steps(study, done)


def run_steps(study: Study, done: dict[str, Any]) -> dict[str, Any]:
    check_extra_eval_reachable(study)
    check_lora_targets(study)

    if study.tiny_model is not None and not is_current(Path(study.model), tiny_model_inputs(study), "config.json"):
        build_tiny_model(study)
        done["tiny_model_built"] = True
    fingerprint = current_fingerprint(study)
    if fingerprint is None:
        from studykit.prepare import prepare

        fingerprint = prepare(study.prepare)["fingerprint"]
        mark_current(study.data_dir, prepare_inputs(study))
        done["prepared"] = True

    for spec in study.runs:
        inputs = run_inputs(spec, fingerprint)
        run_dir = Path(spec.config.output_dir)
        if is_current(run_dir, inputs, "run.json"):
            done["kept"].append(spec.name)
            continue
        train_study_run(spec, inputs, done)

    warn_about_stale_runs(study)
    # A run trained now always gets scored, even one whose inputs match an earlier evaluation.
    evaluated = all(is_current(study.results_dir, eval_inputs(study, fingerprint), name) for name in ("perplexity.json", "per_response_nll.npz"))
    if done["trained"] or not evaluated:
        from studykit.evaluate import evaluate

        print("\n=== evaluating ===")
        evaluate(study.eval)
        mark_current(study.results_dir, eval_inputs(study, fingerprint))
        done["evaluated"] = True

    if done["evaluated"] or not is_current(study.results_dir, report_inputs(study, fingerprint), "results.json", REPORT_INPUTS_FILE):
        with disk_space_for(study.results_dir, REPORT_BYTES, "the report (results, figures, samples)",
                            "free some space and run the same study command again (the trained runs are kept)"):
            write_report(study)
        mark_current(study.results_dir, report_inputs(study, fingerprint), REPORT_INPUTS_FILE)
        done["reported"] = True
    if study.readme is not None:
        done["readme"] = str(study.readme) if update_readme(study) else None
    resumed = f" (resumed {done['resumed']})" if done["resumed"] else ""
    print(f"\ndone: trained {done['trained'] or 'nothing'}{resumed}, kept {done['kept'] or 'nothing'}, "
          f"evaluated: {done['evaluated']}, report: {study.results_dir / 'results.md'}")
    return done


def check_extra_eval_reachable(study: Study) -> None:
    """A hub set for --extra-eval is checked before any training, not hours later at evaluation."""
    extra = study.eval.extra_eval
    if extra and not Path(extra).exists():
        from studykit.hub import ensure_hub_reachable

        ensure_hub_reachable(extra.partition(":")[0], "a local text file as [eval] extra_eval", repo_type="dataset")


def base_model_config(study: Study):
    """The base model's config, all that matching LoRA targets needs: nothing else is read, nothing written; the tiny
    model is described by its [tiny_model] table, not yet built."""
    from transformers import AutoConfig, GPT2Config

    from studykit.hub import ensure_hub_reachable

    if study.tiny_model is not None:
        # The layer count and width make the module names; heads and vocabulary change none, so one head always fits.
        return GPT2Config(n_layer=study.tiny_model["n_layer"], n_embd=study.tiny_model["n_embd"], n_head=1)
    ensure_hub_reachable(study.model, "a local model directory as [budget] model")
    try:
        return AutoConfig.from_pretrained(study.model, trust_remote_code=study.runs[0].config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read a model config from '{study.model}' ({first_line(error)}); set [budget] model to a model "
                        "directory or hub id (and trust_remote_code = true for a model with its own code).") from None


def check_lora_targets(study: Study) -> None:
    """Every LoRA run's target modules are matched against the base model before the first run trains, the same way
    its training will match them, so a run that cannot start is found before the runs ahead of it spend their time."""
    import torch
    from transformers import AutoModelForCausalLM

    from studykit.modeling import wrap_with_lora

    checked, base_config = set(), None
    for spec in study.runs:
        config = spec.config
        adapters = (tuple(config.target_modules), config.use_dora) if spec.method == "lora" else None
        if adapters is None or adapters in checked:
            continue
        checked.add(adapters)
        base_config = base_config or base_model_config(study)
        # Modules without weights (the meta device); a fresh one each time, as wrapping adds the adapters in place.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=config.trust_remote_code)
        try:
            wrap_with_lora(skeleton, config.rank, config.alpha, config.dropout, config.target_modules, config.use_rslora, config.use_dora)
        except UserError as error:
            raise UserError(f"run '{spec.name}' in {study.source} cannot train: {error}") from None


def warn_about_stale_runs(study: Study) -> None:
    listed = {spec.name for spec in study.runs}
    if not study.checkpoints_dir.is_dir():
        return
    for path in sorted(study.checkpoints_dir.iterdir()):
        if path.is_dir() and path.name not in listed and not path.name.startswith("."):
            print(f"warning: {path} is not a run of this study; evaluation scores it but the report leaves it out. "
                  "Delete it to save the time.")


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def load_per_response(path: Path) -> dict[str, Any]:
    import numpy as np

    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # what numpy's zip reader raises
        raise DamagedFile(path, first_line(error), "run the study again: it evaluates again") from None


def write_report(study: Study) -> dict[str, Any]:
    """results.json, results.md, the two figures and samples.md, all in the study's results directory."""
    results_dir = study.results_dir
    records = {spec.name: load_run_record(Path(spec.config.output_dir)).to_dict() for spec in study.runs}
    eval_rows = read_json(results_dir / "perplexity.json", "run the study again: it evaluates again", expect=list)
    built = report.build_report(eval_rows, load_per_response(results_dir / "per_response_nll.npz"), records,
                                study.report["bootstrap_resamples"], study.report["bootstrap_seed"])
    meta = read_json(study.data_dir / META_FILE)
    logs = {spec.name: read_run_log(Path(spec.config.output_dir) / RUN_LOG) for spec in study.runs}
    figures = [report.plot_loss_curves(logs, results_dir / "loss_curves.png"),
               report.plot_perplexity_vs_params(built["rows"], results_dir / "perplexity_vs_params.png")]
    protocol = protocol_paragraph(study, meta, records, any(row["budget_differences"] for row in built["rows"]))
    results = {"study": study.name, "study_file": str(study.source), "study_config": study.settings, "code_version": code_version(),
               "resolved_configs": {spec.name: config_to_dict(spec.config) for spec in study.runs}, "protocol": protocol,
               "data": {key: meta.get(key) for key in ("source", "split_method", "seq_len", "lang", "sequences", "tokens", "fingerprint")},
               **built, "figures": [str(path) for path in figures]}
    atomic_write_json(results_dir / "results.json", results)
    atomic_write_text(results_dir / "results.md", report.format_results_markdown(built, protocol, [str(path) for path in figures]))
    write_samples(study)
    print(report.format_study_table(built))
    print(report.format_budget_check(built))
    print(f"wrote {results_dir / 'results.json'}, results.md, samples.md, {', '.join(path.name for path in figures)}")
    return results


def protocol_paragraph(study: Study, meta: dict[str, Any], records: dict[str, dict[str, Any]], budgets_differ: bool) -> str:
    first_name, first = next(iter(records.items()))
    budget = f"Budget of {first_name} (**runs flagged in the table differ from it**)" if budgets_differ else "Budget, the same for every run"
    config = first["config"]
    learning_rates = ", ".join(f"{name} {record['config']['lr']:g}" for name, record in records.items())
    return (
        f"**Protocol.** Data: {meta['source']} ({meta['split_method']}); assistant responses in language(s) {meta['lang']}, "
        f"not deleted, review passed, non-blank, tokenized with `{meta['tokenizer']}`, EOS appended, cut to {meta['seq_len']} tokens: "
        f"{meta['sequences']['train']:,} training and {meta['sequences']['validation']:,} validation responses "
        f"(data fingerprint `{meta['fingerprint']}`). {budget}: {first['steps']:,} optimizer steps of "
        f"{first['effective_batch']} sequences ({config['batch_size']} x {config['grad_accum']} accumulation), "
        f"seed {first['seed']}, AdamW with {config['warmup_ratio']:.0%} warmup then {config['lr_schedule']} decay, "
        f"precision {first['precision']} on {first['device']}; only the learning rate differs ({learning_rates}). "
        f"Perplexity is exp(total NLL / predicted tokens) over all validation responses, with "
        f"{report.CONFIDENCE:.0%} bootstrap intervals over responses. Study file `{study.source.name}`, code version `{code_version()}`."
    )


def write_samples(study: Study) -> Path:
    prompts_file = study.data_dir / "prompts.json"
    path = study.results_dir / "samples.md"
    if not prompts_file.exists():
        atomic_write_text(path, "# Side-by-side samples\n\nThe processed data has no prompts.json; prepare it again to get samples.\n")
        return path
    prompts = read_json(prompts_file, f"delete {study.data_dir} and run the study again: it prepares the data again",
                        expect=list)[: study.report["sample_prompts"]]
    continuations = generate_continuations(study, prompts, study.report["sample_new_tokens"])
    atomic_write_text(path, report.format_samples_markdown(prompts, continuations, study.report["sample_new_tokens"]))
    return path


def generate_continuations(study: Study, prompts: Sequence[dict[str, str]], max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy continuations of each prompt by the base model and by every run."""
    import torch

    from studykit.modeling import load_base_model, load_checkpoint_for_eval, load_tokenizer, model_context_length
    from studykit.runtime import default_device

    trust_remote_code = study.eval.trust_remote_code
    tokenizer = load_tokenizer(study.eval.tokenizer or study.model, "--tokenizer", trust_remote_code)
    device = default_device()
    targets = {"base": None, **{spec.name: Path(spec.config.output_dir) for spec in study.runs}}
    continuations = {}
    for name, path in targets.items():
        model = (load_base_model(study.model, "--model", trust_remote_code) if path is None
                 else load_checkpoint_for_eval(path, study.model, trust_remote_code))
        model.to(device).eval()
        room = model_context_length(model) - max_new_tokens
        texts = []
        for prompt in prompts:
            # A blank line after the prompt: the models saw responses alone, each starting a text of its own.
            prompt_ids = tokenizer(prompt["text"].strip() + "\n\n", add_special_tokens=False)["input_ids"][-room:]
            input_ids = torch.tensor([prompt_ids], device=device)
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True))
        continuations[name] = texts
        del model
    return continuations


def update_readme(study: Study) -> bool:
    """Rewrite the README's results block (protocol + table); True when its text changed."""
    readme = Path(study.readme)
    if not readme.is_file():
        raise UserError(f"README {readme} does not exist; pass --readme PATH or --no-readme.")
    results = read_json(study.results_dir / "results.json")
    link = os.path.relpath(study.results_dir / "results.md", readme.parent)
    block = (f"{results['protocol']}\n\n{report.format_study_table(results)}\n"
             f"Intervals, the same-budget check, loss curves and samples: [{link}]({link}).\n")
    text = readme.read_text(encoding="utf-8")
    updated = report.replace_marked_block(text, block, str(readme))
    if updated == text:
        return False
    atomic_write_text(readme, updated)
    print(f"rewrote the results block of {readme}")
    return True


def parse_study_args(description: str, argv: Optional[Sequence[str]] = None) -> StudyConfig:
    parser = build_parser(StudyConfig, description)
    # --no-readme beside --readme PATH: an empty path means "leave every README alone".
    parser.add_argument("--no-readme", dest="readme", action="store_const", const="", help="do not rewrite any README")
    return StudyConfig(**vars(parser.parse_args(argv)))
