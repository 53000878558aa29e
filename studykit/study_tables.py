"""The tables of a study file, one builder each: every key and type checked, then the stage config it becomes
validated as that stage's script would, each mistake told with the table (or run) and the file it is in. Also
run_study.py --set, which changes the parsed file before any table is read."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.analysis_config import StudyReportConfig
from studykit.config import (
    MAX_SEED,
    LoraTrainConfig,
    PrepareConfig,
    TrainConfig,
    check_packing_context,
    check_ranges,
    check_settings,
    field_types,
    fields_accepted,
)
from studykit.errors import UserError
from studykit.grid_extension import DEFAULT_GRID_EXTENSIONS
from studykit.methods import METHODS
from studykit.runtime import REPO_ROOT
from studykit.study_config import EvalConfig, StudyConfig, TinyModelConfig

# Set by the runner for every run, never by the study file: where things go, how an old run is replaced, and where it
# is uploaded (run_study.py --push-to-hub names a repo per training; one repo in [budget] would be every training's).
RUNNER_OWNED = {"output_dir", "data_dir", "resume", "overwrite", "device", "push_to_hub"}

STUDY_TABLES = {"study", "tiny_model", "data", "budget", "eval", "report", "analysis", "runs", "launcher"}

# [launcher]: the cluster and its job settings, each also a run_study.py flag of that name (StudyConfig), which wins.
LAUNCHER_KEYS = (
    "cluster",
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "mem_gb",
    "time_limit_min",
    "account",
    "qos",
    "array_parallelism",
    "sbatch_lines",
)

STUDY_HEADER_TYPES = {"name": str, "output_dir": str, "readme": str}

# Every run of a study trains and is scored on one base model and one tokenization: these are set once, in [budget].
SHARED_BY_ALL_RUNS = {"model", "tokenizer"}

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# [budget] keys about the study's replication rather than one training: every run's seeds, and those its
# learning-rate sweep is trained with (the first seed by default) before the chosen rate is trained with every seed.
SEED_KEYS = ("seeds", "sweep_seeds")
# [budget] key about the protocol rather than one training: how many rates a run's grid may add beyond its ends
# (grid_extension.py).
GRID_EXTENSIONS_KEY = "grid_extensions"


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


def repo_path(value: str) -> Path:
    """Paths inside a study file are relative to the repository root, so a preset runs from any directory."""
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def _table(settings: dict[str, Any], key: str, source: Path) -> dict[str, Any]:
    value = settings.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"[{key}] in {source} must be a table of settings; see studies/default.toml.")
    return dict(value)


def check_stage_settings(
    values: dict[str, Any], config_cls: type, where: str, source: Path, accepted: Optional[str] = None
) -> None:
    check_settings(values, field_types(config_cls), f"{where} in {source}", accepted or fields_accepted(config_cls))


def _build(config_cls: type, values: dict[str, Any], where: str, source: Path):
    """A stage config from study-file values already checked by check_settings, validated as its script would; the
    stage names its flag, so the error is told where in the study file that setting is."""
    config = config_cls(**values)
    try:
        # A stage's message names its flag, as its script's would; [tiny_model] and [report] have only their keys.
        check_ranges(config, names="keys" if config_cls in (TinyModelConfig, StudyReportConfig) else "flags")
        config.validate()
    except UserError as error:
        raise UserError(f"{where} in {source}: {error}") from None
    return config


def _reject_runner_owned(values: dict[str, Any], owned: set[str], where: str, source: Path) -> None:
    clashing = sorted(owned & set(values))
    if clashing:
        raise UserError(
            f"{where} in {source} sets {clashing}, which the runner sets for every run; remove them "
            "(use [study] output_dir or --output-dir to move the study, run_study.py --device to choose the device, "
            "and --push-to-hub to upload)."
        )


def _learning_rates(value: Any, where: str, source: Path) -> list[float]:
    """`lr = 1e-4` or a grid `lr = [1e-5, 3e-5, 1e-4]`: finite numbers above 0, each once; sorted."""
    rates = value if isinstance(value, list) else [value]
    if not rates or not all(
        isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0
        for rate in rates
    ):
        raise UserError(
            f"{where} in {source} sets lr = {json.dumps(value)}; write a number above 0 or a list of them, "
            "e.g. lr = [1e-4, 3e-4, 1e-3]."
        )
    if len(set(rates)) != len(rates):
        raise UserError(f"{where} in {source} lists a learning rate twice ({json.dumps(value)}); list each rate once.")
    return sorted(float(rate) for rate in rates)


def _seeds(
    budget: dict[str, Any], source: Path, seeds_override: Optional[Sequence[int]]
) -> tuple[list[int], list[int]]:
    """[budget] seeds and sweep_seeds (or a single `seed`); --seeds replaces the study file's seeds."""
    for key in SEED_KEYS:
        value = budget.get(key)
        if value is not None and not (
            isinstance(value, list)
            and value
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value)
            and len(set(value)) == len(value)
        ):
            raise UserError(
                f"[budget] in {source} sets {key} = {json.dumps(value)}; write a list of different whole numbers "
                f"from 0 to {MAX_SEED}, e.g. {key} = [0, 1, 2]."
            )
    if "seeds" in budget and "seed" in budget:
        raise UserError(
            f"[budget] in {source} sets both seed and seeds; keep seeds (every run is trained with each of them)."
        )
    single = budget.get("seed")
    if single is not None and (isinstance(single, bool) or not isinstance(single, int) or not 0 <= single <= MAX_SEED):
        raise UserError(
            f"[budget] in {source} sets seed = {json.dumps(single)}; write a whole number from 0 to {MAX_SEED}."
        )
    seeds = list(seeds_override or budget.pop("seeds", None) or [budget.pop("seed", TrainConfig.seed)])
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds lists a seed twice ({seeds}); list each seed once.")
    sweep_seeds = budget.pop("sweep_seeds", None)
    if sweep_seeds is None or (seeds_override and not set(sweep_seeds) <= set(seeds)):
        sweep_seeds = seeds[:1]
    if not set(sweep_seeds) <= set(seeds):
        raise UserError(
            f"[budget] in {source} sets sweep_seeds = {sweep_seeds}, not all of them among seeds = {seeds}; "
            "sweep with some of the seeds every run is trained with."
        )
    budget.pop("seeds", None)
    return seeds, list(sweep_seeds)


def read_settings(path: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """The parsed study file with --set's `overrides` applied, and what messages call it (a mistake that came from
    --set is told as such)."""
    try:
        settings = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML ({error}); fix the file.") from None
    apply_overrides(settings, overrides, path)
    source = f"{path} with --set {' '.join(overrides)}" if overrides else path
    unknown = sorted(set(settings) - STUDY_TABLES)
    if unknown:
        raise UserError(f"{source} has unknown table(s) {unknown}; a study file has {sorted(STUDY_TABLES)}.")
    return settings, source


def study_header(settings: dict[str, Any], source: Any) -> dict[str, Any]:
    """[study]: the study's name, output_dir and readme."""
    header = _table(settings, "study", source)
    check_settings(
        header,
        {key: (kind, None) for key, kind in STUDY_HEADER_TYPES.items()},
        f"[study] in {source}",
        f"the keys {sorted(STUDY_HEADER_TYPES)}",
    )
    return header


def budget_table(
    settings: dict[str, Any], source: Any, seeds_override: Optional[Sequence[int]]
) -> tuple[dict[str, Any], list[int], list[int], Optional[list[float]], int]:
    """[budget]: the training settings every run shares, then the study's seeds, sweep seeds, learning rates and grid
    extensions, which are taken out of it."""
    budget = _table(settings, "budget", source)
    study_seeds, sweep_seeds = _seeds(budget, source, seeds_override)
    budget_rates = _learning_rates(budget.pop("lr"), "[budget]", source) if "lr" in budget else None
    grid_extensions = budget.pop(GRID_EXTENSIONS_KEY, DEFAULT_GRID_EXTENSIONS)
    if isinstance(grid_extensions, bool) or not isinstance(grid_extensions, int) or grid_extensions < 0:
        raise UserError(
            f"[budget] in {source} sets {GRID_EXTENSIONS_KEY} = {json.dumps(grid_extensions)}; write a whole number, "
            "0 or more (the most rates a run's grid may add beyond its ends; 0: never)."
        )
    # LoRA settings may sit in [budget] when every run is a LoRA run; _run_spec refuses them for a full run.
    check_stage_settings(
        budget,
        LoraTrainConfig,
        "[budget]",
        source,
        f"fields of TrainConfig or LoraTrainConfig (the training flags with _ for -), or "
        f"{', '.join(SEED_KEYS)} or {GRID_EXTENSIONS_KEY}",
    )
    _reject_runner_owned(budget, RUNNER_OWNED, "[budget]", source)
    return budget, study_seeds, sweep_seeds, budget_rates, grid_extensions


def tiny_model_table(
    settings: dict[str, Any], budget: dict[str, Any], root: Path, source: Any
) -> Optional[TinyModelConfig]:
    """[tiny_model], if the study builds its model; the model it builds becomes [budget] model."""
    if "tiny_model" not in settings:
        return None
    tiny_table = _table(settings, "tiny_model", source)
    check_stage_settings(tiny_table, TinyModelConfig, "[tiny_model]", source)
    tiny_model = _build(TinyModelConfig, tiny_table, "[tiny_model]", source)
    tiny_model.data_file = str(repo_path(tiny_model.data_file))
    tiny_model.general_text = str(repo_path(tiny_model.general_text))
    if tiny_model.heldout_text:
        tiny_model.heldout_text = str(repo_path(tiny_model.heldout_text))
    if "model" in budget:
        raise UserError(f"{source} has both [tiny_model] and [budget] model; keep one of them.")
    budget["model"] = str(root / "tiny-gpt2")
    return tiny_model


def data_table(settings: dict[str, Any], tokenizer: str, root: Path, source: Any) -> PrepareConfig:
    """[data]: the prepare stage, with the study's tokenizer and its processed directory."""
    data = _table(settings, "data", source)
    _reject_runner_owned(data, {"output_dir", "tokenizer", "overwrite"}, "[data]", source)
    check_stage_settings(data, PrepareConfig, "[data]", source)
    if data.get("data_file"):
        data["data_file"] = str(repo_path(data["data_file"]))
    # The runner decides whether the data is current; a dataset it prepares replaces the one made from older inputs.
    return _build(
        PrepareConfig,
        {**data, "tokenizer": tokenizer, "output_dir": str(root / "processed"), "overwrite": True},
        "[data]",
        source,
    )


def runs_table(
    settings: dict[str, Any],
    budget: dict[str, Any],
    budget_rates: Optional[list[float]],
    prepare: PrepareConfig,
    root: Path,
    source: Any,
) -> list[RunSpec]:
    """[[runs]]: each run's method and settings over [budget], checked against the data [data] prepares."""
    entries = settings.get("runs", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"runs in {source} must be [[runs]] tables, one per run; see studies/default.toml.")
    runs = [_run_spec(entry, budget, budget_rates, root, source) for entry in entries]
    if not runs:
        raise UserError(f"{source} lists no [[runs]]; add at least one run (see studies/default.toml).")
    for spec in runs:
        try:
            check_packing_context(spec.config.packing, prepare.context)
        except UserError as error:
            raise UserError(
                f"run '{spec.name}' in {source} with [data] context = \"{prepare.context}\": {error}"
            ) from None
    names = [spec.name for spec in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{source} names a run twice ({names}); give every [[runs]] entry its own name.")
    return runs


def eval_table(settings: dict[str, Any], model: str, tokenizer: Optional[str], root: Path, source: Any) -> EvalConfig:
    """[eval]: scoring the study's checkpoints on its processed test split, with the study's model and tokenizer."""
    evaluation = _table(settings, "eval", source)
    _reject_runner_owned(evaluation, {"model", "tokenizer", "data_dir", "checkpoints", "output_dir"}, "[eval]", source)
    check_stage_settings(evaluation, EvalConfig, "[eval]", source)
    if evaluation.get("extra_eval") and repo_path(evaluation["extra_eval"]).is_file():
        evaluation["extra_eval"] = str(repo_path(evaluation["extra_eval"]))
    return _build(
        EvalConfig,
        {
            **evaluation,
            "model": model,
            "tokenizer": tokenizer,
            "data_dir": str(root / "processed"),
            "checkpoints": str(root / "checkpoints"),
            "output_dir": str(root / "results"),
        },
        "[eval]",
        source,
    )


def settings_table(settings: dict[str, Any], key: str, config_cls: type, source: Any):
    """A table that is one config and nothing else: [report], [analysis]."""
    values = _table(settings, key, source)
    check_stage_settings(values, config_cls, f"[{key}]", source)
    return _build(config_cls, values, f"[{key}]", source)


def launcher_table(settings: dict[str, Any], source: Any) -> dict[str, Any]:
    """[launcher], checked as its flags would be."""
    table = _table(settings, "launcher", source)
    types = field_types(StudyConfig)
    check_settings(
        table, {key: types[key] for key in LAUNCHER_KEYS}, f"[launcher] in {source}", f"the keys {list(LAUNCHER_KEYS)}"
    )
    _build(StudyConfig, table, "[launcher]", source)
    return table


def toml_value(text: str) -> Any:
    """A --set value as TOML reads it (`1e-4`, `[1e-4, 3e-4]`, `"text"`, `true`); anything that is not one TOML value
    is the text itself, a string (`--set budget.optimizer=adamw8bit`), checked as the setting's type like the file's."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if set(parsed) == {"value"} else text


def apply_overrides(settings: dict[str, Any], overrides: Sequence[str], path: Path) -> None:
    """run_study.py's --set TABLE.KEY=VALUE (or runs.NAME.KEY=VALUE: the [[runs]] entry of that name), in the order
    given, onto the parsed study file, which is then checked as a whole as if the file said so."""
    tables = sorted(STUDY_TABLES - {"runs"})
    for override in overrides:
        address, equals, text = override.partition("=")
        keys = address.strip().split(".")
        if not equals or not all(keys):
            raise UserError(
                f"--set {override} is not TABLE.KEY=VALUE; write e.g. --set budget.lr=1e-4 or --set runs.NAME.rank=16."
            )
        value = toml_value(text.strip())
        if keys[0] == "runs":
            runs = [entry for entry in settings.get("runs", []) if isinstance(entry, dict)]
            named = [entry for entry in runs if len(keys) == 3 and entry.get("name") == keys[1]]
            if not named:
                raise UserError(
                    f"--set {override} names no run of {path}: write runs.NAME.KEY=VALUE with NAME one of "
                    f"{[entry.get('name') for entry in runs]}."
                )
            named[0][keys[2]] = value
            continue
        if keys[0] not in tables or len(keys) != 2:
            raise UserError(
                f"--set {override} names no setting of a study file: write TABLE.KEY=VALUE with TABLE one of {tables}, "
                "or runs.NAME.KEY=VALUE."
            )
        table = settings.setdefault(keys[0], {})
        if not isinstance(table, dict):
            raise UserError(f"[{keys[0]}] in {path} must be a table of settings; see studies/default.toml.")
        table[keys[1]] = value


def _run_spec(
    entry: dict[str, Any], budget: dict[str, Any], budget_rates: Optional[list[float]], root: Path, source: Path
) -> RunSpec:
    entry = dict(entry)
    name, method = str(entry.pop("name", "")), entry.pop("method", None)
    if not RUN_NAME.fullmatch(name) or "__" in name:
        raise UserError(
            f"a [[runs]] entry in {source} has no usable name ('{name}'); give it a name of letters, digits, _ . - "
            "(without a double underscore, which separates a training's run, rate and seed)."
        )
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"run '{name}' in {source} has method {method!r}; use one of {sorted(METHODS)}.")
    config_cls = METHODS[method].config_class
    shared = sorted(SHARED_BY_ALL_RUNS & set(entry))
    if shared:
        raise UserError(
            f"run '{name}' in {source} sets {shared}, but the runs of a study are compared on one base model and one "
            f"tokenization; set {' and '.join(shared)} once for the whole study in [budget] (or build a [tiny_model])."
        )
    if "seed" in entry or any(key in entry for key in SEED_KEYS):
        raise UserError(
            f"run '{name}' in {source} sets its own seed, but every run is trained with the study's seeds (the same "
            "data order per seed for every method); set [budget] seeds instead."
        )
    _reject_runner_owned(entry, RUNNER_OWNED, f"run '{name}'", source)
    rates = _learning_rates(entry.pop("lr"), f"run '{name}'", source) if "lr" in entry else budget_rates
    check_stage_settings(entry, config_cls, f"run '{name}'", source)
    not_taken = sorted(set(budget) - set(field_types(config_cls)))
    if not_taken:
        raise UserError(
            f"[budget] in {source} sets {not_taken}, which run '{name}' (method '{method}') does not take; "
            "set them in the [[runs]] entries that use them."
        )
    values = {**budget, **entry, "output_dir": str(root / "checkpoints" / name), "data_dir": str(root / "processed")}
    if rates:
        values["lr"] = rates[0]
    config = _build(config_cls, values, f"run '{name}'", source)
    return RunSpec(name, method, config, rates or [config.lr])
