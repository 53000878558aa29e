"""The commands: each parses its stage's config from the command line and runs the stage, a user's mistake reported
as one `error:` line. The scripts in data/, training/, evaluation/ and run_study.py call these."""

from __future__ import annotations

from studykit.errors import report_user_errors


def prepare_main(description: str) -> None:
    from studykit.config import PrepareConfig, parse_config
    from studykit.prepare import prepare

    report_user_errors(lambda: prepare(parse_config(PrepareConfig, description)))()


def train_method(method_name: str, description: str) -> None:
    """Train with the method named in methods.METHODS: its config class gives the flags."""
    from studykit.config import parse_config
    from studykit.methods import METHODS
    from studykit.trainer import train

    report_user_errors(lambda: train(parse_config(METHODS[method_name].config_class, description)))()


def evaluate_main(description: str) -> None:
    from studykit.config import EvalConfig, parse_config
    from studykit.evaluate import evaluate

    report_user_errors(lambda: evaluate(parse_config(EvalConfig, description)))()


def study_main(description: str) -> None:
    from studykit.study import parse_study_args, run_study

    report_user_errors(lambda: run_study(parse_study_args(description)))()
