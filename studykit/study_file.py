"""Reading a study file: [study], [tiny_model], [data], [budget], [[runs]], [eval] and [report] become the stage configs
of every step, checked in full (every key, every type, every run's settings) before any step runs; [launcher] holds
where run_study.py --launcher submitit sends the trainings (its flags win over it). Each table's builder is in
studykit/study_tables.py; here are what they build, the Study and its trainings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.analysis_config import AnalysisConfig, StudyReportConfig
from studykit.config import PrepareConfig, TrainConfig
from studykit.errors import UserError
from studykit.grid_extension import DEFAULT_GRID_EXTENSIONS
from studykit.runtime import REPO_ROOT
from studykit.study_config import EvalConfig, StudyConfig, TinyModelConfig
from studykit.study_tables import (
    RunSpec,
    budget_table,
    data_table,
    eval_table,
    launcher_table,
    read_settings,
    repo_path,
    runs_table,
    settings_table,
    study_header,
    tiny_model_table,
)

STUDIES_DIR = REPO_ROOT / "studies"


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
    report: StudyReportConfig
    readme: Optional[Path]
    seeds: list[int]
    sweep_seeds: list[int]
    overrides: list[str] = dataclasses.field(default_factory=list)  # run_study.py's --set, applied to `settings`
    analysis: AnalysisConfig = dataclasses.field(default_factory=AnalysisConfig)
    grid_extensions: int = DEFAULT_GRID_EXTENSIONS  # rates a run's grid may add beyond its ends, at most
    launcher: dict[str, Any] = dataclasses.field(default_factory=dict)  # the [launcher] table, checked

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
        config = dataclasses.replace(
            spec.config, lr=lr, seed=seed, output_dir=str(self.checkpoints_dir / training_name(spec.name, lr, seed))
        )
        return Training(spec.name, spec.method, lr, seed, config)

    def sweep_trainings(self, spec: RunSpec, learning_rates: Optional[Sequence[float]] = None) -> list[Training]:
        """The trainings that choose the run's learning rate: every rate of its grid (or of `learning_rates`, the grid
        with the rates added beyond its ends), with the sweep seeds."""
        rates = spec.learning_rates if learning_rates is None else learning_rates
        return [self.training(spec, lr, seed) for lr in rates for seed in self.sweep_seeds]

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


def load_study(
    path: Path,
    output_dir: Optional[str] = None,
    readme: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    overrides: Sequence[str] = (),
) -> Study:
    """Stage configs for every step of the study: [data] -> prepare, [budget] + [[runs]] -> training, [eval].
    The whole file is checked here, with --set's `overrides` applied, before any step runs: a mistake in the last run
    must not surface after the first runs have trained."""
    settings, source = read_settings(path, overrides)
    header = study_header(settings, source)
    name = header.get("name", Path(path).stem)
    root = Path(output_dir) if output_dir else repo_path(header.get("output_dir", f"runs/{name}"))
    readme_path = (
        None
        if readme == ""
        else Path(readme)
        if readme
        else repo_path(header["readme"])
        if header.get("readme")
        else None
    )
    budget, study_seeds, sweep_seeds, budget_rates, grid_extensions = budget_table(settings, source, seeds)
    tiny_model = tiny_model_table(settings, budget, root, source)
    model = budget.get("model", TrainConfig.model)
    prepare = data_table(settings, budget.get("tokenizer") or model, root, source)
    runs = runs_table(settings, budget, budget_rates, prepare, root, source)
    return Study(
        name,
        Path(path),
        settings,
        root,
        model,
        tiny_model,
        prepare,
        runs,
        eval_table(settings, model, budget.get("tokenizer"), root, source),
        settings_table(settings, "report", StudyReportConfig, source),
        readme_path,
        study_seeds,
        sweep_seeds,
        list(overrides),
        settings_table(settings, "analysis", AnalysisConfig, source),
        grid_extensions,
        launcher_table(settings, source),
    )


def with_launcher_table(config: StudyConfig, study: Study) -> StudyConfig:
    """run_study.py's flags, with the study file's [launcher] settings where a flag was not given."""
    unset = {key: value for key, value in study.launcher.items() if getattr(config, key) in (None, [])}
    return dataclasses.replace(config, **unset)
