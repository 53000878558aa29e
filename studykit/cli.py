"""The commands: each parses its stage's config from the command line and runs the stage, a user's mistake reported
as one `error:` line and the dependencies' log messages kept quiet unless --verbose
(studykit/dependency_logs.py). The console entry points (studykit-prepare, studykit-train-full, studykit-train-lora,
studykit-eval, studykit-study, studykit-analyze; pyproject.toml) and the scripts in data/, training/, evaluation/ and
run_study.py call these functions, so a script and its entry point print the same --help."""

from __future__ import annotations

import sys

from studykit.dependency_logs import quiet_dependencies
from studykit.errors import report_user_errors

PREPARE_DESCRIPTION = (
    "Stage 1: OASST1 assistant responses -> filtered, tokenized sequences on disk (data/processed by default)."
)
EVALUATE_DESCRIPTION = (
    "Stage 4: held-out perplexity, exp(total NLL / total predicted tokens), for the base model and every run."
)
STUDY_DESCRIPTION = """The whole controlled study in one command: prepare -> every training run -> evaluation -> report.

`run_study.py` (or `studykit-study`) runs studies/default.toml (GPT-2 Small, OASST1 from the hub: full FT, LoRA r=8,
LoRA r=32 under one budget); `--preset quick` a tiny offline study on a CPU; `--config PATH` a study file of your own;
`--set TABLE.KEY=VALUE` changes one of its settings. Steps whose inputs have not changed are kept; `--dry-run` prints
the plan.
"""


def prepare_command() -> None:
    quiet_dependencies(sys.argv[1:])
    from studykit.config import PrepareConfig, parse_config
    from studykit.prepare import prepare

    report_user_errors(lambda: prepare(parse_config(PrepareConfig, PREPARE_DESCRIPTION)))()


def train_method(method_name: str) -> None:
    """Train with the method named in methods.METHODS: its config class gives the flags."""
    quiet_dependencies(sys.argv[1:])
    from studykit.config import parse_config
    from studykit.methods import METHODS
    from studykit.trainer import train

    config_class = METHODS[method_name].config_class
    description = METHODS[method_name].command_description
    report_user_errors(lambda: train(parse_config(config_class, description)))()


def train_full_command() -> None:
    train_method("full")


def train_lora_command() -> None:
    train_method("lora")


def evaluate_command() -> None:
    quiet_dependencies(sys.argv[1:])
    from studykit.config import parse_config
    from studykit.evaluate import evaluate
    from studykit.study_config import EvalConfig

    report_user_errors(lambda: evaluate(parse_config(EvalConfig, EVALUATE_DESCRIPTION)))()


def study_command() -> None:
    quiet_dependencies(sys.argv[1:])
    from studykit.study import parse_study_args, run_study

    report_user_errors(lambda: run_study(parse_study_args(STUDY_DESCRIPTION)))()


def analyze_command() -> None:
    quiet_dependencies(sys.argv[1:])
    from studykit.analysis import analyze_command as analyze

    analyze()
