"""Reading a study file: [study], [tiny_model], [data], [budget], [[runs]], [eval] and [report] become the stage configs
of every step, checked in full (every key, every type, every run's settings) before any step runs."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.config import (
    EvalConfig,
    LoraTrainConfig,
    PrepareConfig,
    ReportConfig,
    StudyConfig,
    TinyModelConfig,
    TrainConfig,
    check_packing_context,
    unwrap_optional,
)
from studykit.errors import UserError
from studykit.methods import METHODS
from studykit.runtime import REPO_ROOT

STUDIES_DIR = REPO_ROOT / "studies"

# Set by the runner for every run, never by the study file: where things go and how an old run is replaced.
RUNNER_OWNED = {"output_dir", "data_dir", "resume", "overwrite", "device"}

STUDY_TABLES = {"study", "tiny_model", "data", "budget", "eval", "report", "runs"}

STUDY_HEADER_TYPES = {"name": str, "output_dir": str, "readme": str}

# Every run of a study trains and is scored on one base model and one tokenization: these are set once, in [budget].
SHARED_BY_ALL_RUNS = {"model", "tokenizer"}

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# [budget] keys about the study's replication rather than one training: every run's seeds, and those its
# learning-rate sweep is trained with (the first seed by default) before the chosen rate is trained with every seed.
SEED_KEYS = ("seeds", "sweep_seeds")


@dataclasses.dataclass
class RunSpec:
    """One row of the comparison: a method and its settings, trained at each of its learning rates and seeds."""

    name: str
    method: str
    config: TrainConfig  # what every training of the run shares; each training sets its own lr, seed and output_dir
    learning_rates: list[float]

    @property
    def sweeps(self) -> bool:
        return len(self.learning_rates) > 1


@dataclasses.dataclass
class Training:
    """One training of a study: a run at one learning rate and one seed, in its own directory."""

    run: str
    method: str
    lr: float
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return training_name(self.run, self.lr, self.seed)


def lr_label(lr: float) -> str:
    """3e-4 as `3e-4` and 1.5e-4 as `1.5e-4`: short, exact enough to tell a grid's rates apart, safe in a file name."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def training_name(run: str, lr: float, seed: int) -> str:
    return f"{run}__lr{lr_label(lr)}__seed{seed}"


@dataclasses.dataclass
class Study:
    name: str
    source: Path
    settings: dict[str, Any]
    output_dir: Path
    model: str
    tiny_model: Optional[TinyModelConfig]
    prepare: PrepareConfig
    runs: list[RunSpec]
    eval: EvalConfig
    report: ReportConfig
    readme: Optional[Path]
    seeds: list[int]
    sweep_seeds: list[int]

    @property
    def data_dir(self) -> Path:
        return self.output_dir / "processed"

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def results_dir(self) -> Path:
        return self.output_dir / "results"

    def training(self, spec: RunSpec, lr: float, seed: int) -> Training:
        config = dataclasses.replace(spec.config, lr=lr, seed=seed,
                                     output_dir=str(self.checkpoints_dir / training_name(spec.name, lr, seed)))
        return Training(spec.name, spec.method, lr, seed, config)

    def sweep_trainings(self, spec: RunSpec) -> list[Training]:
        """The trainings that choose the run's learning rate: every rate of its grid, with the sweep seeds."""
        return [self.training(spec, lr, seed) for lr in spec.learning_rates for seed in self.sweep_seeds]

    def replicate_trainings(self, spec: RunSpec, lr: float) -> list[Training]:
        """The chosen rate with every seed (the sweep seeds' trainings among them, already trained by the sweep)."""
        return [self.training(spec, lr, seed) for seed in self.seeds]


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
                        "(use [study] output_dir or --output-dir to move the study, and run_study.py --device to choose the device).")


def _learning_rates(value: Any, where: str, source: Path) -> list[float]:
    """`lr = 1e-4` or a grid `lr = [1e-5, 3e-5, 1e-4]`: finite numbers above 0, each once; sorted."""
    rates = value if isinstance(value, list) else [value]
    if not rates or not all(isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
                            for rate in rates):
        raise UserError(f"{where} in {source} sets lr = {json.dumps(value)}; write a number above 0 or a list of them, "
                        "e.g. lr = [1e-4, 3e-4, 1e-3].")
    if len(set(rates)) != len(rates):
        raise UserError(f"{where} in {source} lists a learning rate twice ({json.dumps(value)}); list each rate once.")
    return sorted(float(rate) for rate in rates)


def _seeds(budget: dict[str, Any], source: Path, seeds_override: Optional[Sequence[int]]) -> tuple[list[int], list[int]]:
    """[budget] seeds and sweep_seeds (or a single `seed`); --seeds replaces the study file's seeds."""
    for key in SEED_KEYS:
        value = budget.get(key)
        if value is not None and not (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
                                      and len(set(value)) == len(value)):
            raise UserError(f"[budget] in {source} sets {key} = {json.dumps(value)}; write a list of different whole numbers, "
                            f"e.g. {key} = [0, 1, 2].")
    if "seeds" in budget and "seed" in budget:
        raise UserError(f"[budget] in {source} sets both seed and seeds; keep seeds (every run is trained with each of them).")
    seeds = list(seeds_override or budget.pop("seeds", None) or [budget.pop("seed", TrainConfig.seed)])
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice ({seeds}); list each seed once.")
    sweep_seeds = budget.pop("sweep_seeds", None)
    if sweep_seeds is None or (seeds_override and not set(sweep_seeds) <= set(seeds)):
        sweep_seeds = seeds[:1]
    if not set(sweep_seeds) <= set(seeds):
        raise UserError(f"[budget] in {source} sets sweep_seeds = {sweep_seeds}, not all of them among seeds = {seeds}; "
                        "sweep with some of the seeds every run is trained with.")
    budget.pop("seeds", None)
    return seeds, list(sweep_seeds)


def load_study(path: Path, output_dir: Optional[str] = None, readme: Optional[str] = None,
               seeds: Optional[Sequence[int]] = None) -> Study:
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
    study_seeds, sweep_seeds = _seeds(budget, path, seeds)
    budget_rates = _learning_rates(budget.pop("lr"), "[budget]", path) if "lr" in budget else None
    # LoRA settings may sit in [budget] when every run is a LoRA run; _run_spec refuses them for a full run.
    check_stage_settings(budget, LoraTrainConfig, "[budget]", path, "fields of TrainConfig or LoraTrainConfig (the training flags with _ for -)"
                         f", or {' or '.join(SEED_KEYS)}")
    _reject_runner_owned(budget, RUNNER_OWNED, "[budget]", path)
    tiny_model = None
    if "tiny_model" in settings:
        tiny_table = _table(settings, "tiny_model", path)
        check_stage_settings(tiny_table, TinyModelConfig, "[tiny_model]", path)
        tiny_model = _build(TinyModelConfig, tiny_table, "[tiny_model]", path)
        tiny_model.data_file = str(repo_path(tiny_model.data_file))
        tiny_model.general_text = str(repo_path(tiny_model.general_text))
        if tiny_model.heldout_text:
            tiny_model.heldout_text = str(repo_path(tiny_model.heldout_text))
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
    runs = [_run_spec(entry, budget, budget_rates, root, path) for entry in entries]
    if not runs:
        raise UserError(f"{path} lists no [[runs]]; add at least one run (see studies/default.toml).")
    for spec in runs:
        try:
            check_packing_context(spec.config.packing, prepare.context)
        except UserError as error:
            raise UserError(f"run '{spec.name}' in {path} with [data] context = \"{prepare.context}\": "
                            f"{error}") from None
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
    check_stage_settings(report_settings, ReportConfig, "[report]", path)
    report_config = _build(ReportConfig, report_settings, "[report]", path)
    return Study(name, Path(path), settings, root, model, tiny_model, prepare, runs, eval_config, report_config, readme_path,
                 study_seeds, sweep_seeds)


def _run_spec(entry: dict[str, Any], budget: dict[str, Any], budget_rates: Optional[list[float]], root: Path,
              source: Path) -> RunSpec:
    entry = dict(entry)
    name, method = str(entry.pop("name", "")), entry.pop("method", None)
    if not RUN_NAME.fullmatch(name) or "__" in name:
        raise UserError(f"a [[runs]] entry in {source} has no usable name ('{name}'); give it a name of letters, digits, _ . - "
                        "(without a double underscore, which separates a training's run, rate and seed).")
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"run '{name}' in {source} has method {method!r}; use one of {sorted(METHODS)}.")
    config_cls = METHODS[method].config_class
    shared = sorted(SHARED_BY_ALL_RUNS & set(entry))
    if shared:
        raise UserError(f"run '{name}' in {source} sets {shared}, but the runs of a study are compared on one base model and one "
                        f"tokenization; set {' and '.join(shared)} once for the whole study in [budget] (or build a [tiny_model]).")
    if "seed" in entry or any(key in entry for key in SEED_KEYS):
        raise UserError(f"run '{name}' in {source} sets its own seed, but every run is trained with the study's seeds (the same "
                        "data order per seed for every method); set [budget] seeds instead.")
    _reject_runner_owned(entry, RUNNER_OWNED, f"run '{name}'", source)
    rates = _learning_rates(entry.pop("lr"), f"run '{name}'", source) if "lr" in entry else budget_rates
    check_stage_settings(entry, config_cls, f"run '{name}'", source)
    not_taken = sorted(set(budget) - set(_field_types(config_cls)))
    if not_taken:
        raise UserError(f"[budget] in {source} sets {not_taken}, which run '{name}' (method '{method}') does not take; "
                        "set them in the [[runs]] entries that use them.")
    values = {**budget, **entry, "output_dir": str(root / "checkpoints" / name), "data_dir": str(root / "processed")}
    if rates:
        values["lr"] = rates[0]
    config = _build(config_cls, values, f"run '{name}'", source)
    return RunSpec(name, method, config, rates or [config.lr])
