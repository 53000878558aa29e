"""A command's stderr is the kit's own: the dependencies' log messages and warnings stay quiet at the entry points
unless --verbose (or STUDYKIT_VERBOSE=1) asks for them, so a refused command prints one `error:` line whatever
versions are installed."""

import logging
import os
import subprocess
import sys
import warnings

import pytest
from conftest import LORA, REPO_ROOT, refused, run_script

from studykit import dependency_logs
from studykit.config import LoraTrainConfig, PrepareConfig, TrainConfig, parse_config
from studykit.study import parse_study_args
from studykit.study_config import EvalConfig, StudyConfig

# Each library logs a warning and raises a Python warning from inside it, then the kit refuses: what reaches stderr.
CHATTY_COMMAND = """
import logging, sys, warnings
from studykit.dependency_logs import LIBRARIES, quiet_dependencies
quiet_dependencies(sys.argv[1:])
for library in LIBRARIES:
    logging.getLogger(library + ".some.module").warning("%s says something", library)
    exec(compile("import warnings; warnings.warn('a warning from inside')", library + "/module.py", "exec"),
         {"__name__": library + ".module"})
print("error: the kit's own sentence.", file=sys.stderr)
"""


def run_chatty(*args, **env):
    environment = {key: value for key, value in os.environ.items() if not key.endswith("VERBOSITY")}
    environment.pop(dependency_logs.VERBOSE_ENVIRONMENT, None)
    return subprocess.run(
        [sys.executable, "-c", CHATTY_COMMAND, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**environment, "PYTHONPATH": str(REPO_ROOT), **env},
        timeout=120,
    )


def test_the_dependencies_are_quiet_by_default_and_heard_with_verbose():
    assert run_chatty().stderr.splitlines() == ["error: the kit's own sentence."]
    for heard in (run_chatty("--verbose"), run_chatty(**{dependency_logs.VERBOSE_ENVIRONMENT: "1"})):
        lines = heard.stderr.splitlines()
        assert "kernels says something" in lines and "transformers says something" in lines, heard.stderr
        assert "a warning from inside" in heard.stderr and lines[-1] == "error: the kit's own sentence."


def test_a_process_a_quiet_command_starts_is_quiet_too():
    """A study's trainings run in processes forked from a server that imports the trainer (and so bitsandbytes and
    kernels) before any entry point runs: importing studykit there quiets them as their parent was."""
    code = (
        "import logging, studykit; "
        "logging.getLogger('kernels._internals.hf_hub').warning('kernels says something'); "
        "import sys; print('done', file=sys.stderr)"
    )
    environment = {key: value for key, value in os.environ.items() if not key.startswith("STUDYKIT_")}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    for quiet, expected in (("1", ["done"]), ("", ["kernels says something", "done"])):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**environment, dependency_logs.QUIET_ENVIRONMENT: quiet},
            timeout=120,
        )
        assert result.stderr.splitlines() == expected, result.stderr


def test_an_error_a_dependency_logs_still_shows():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from studykit.dependency_logs import quiet_dependencies; quiet_dependencies([]); import logging; "
            "logging.getLogger('datasets.builder').error('the cache is corrupt')",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert "the cache is corrupt" in result.stderr


def test_a_refused_lora_run_prints_one_line_with_the_loggers_at_their_defaults(tmp_path, small_vocab_inputs):
    """peft loads bitsandbytes, which (with `kernels` installed, as transformers 5.25 requires) logged a line about
    the Hub's offline mode ahead of the error; nothing here quiets the loggers but the kit itself."""
    message = refused(
        LORA,
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--output-dir",
        tmp_path / "run",
        "--target-modules",
        "nope",
        "--max-steps",
        "1",
        watch=[tmp_path],
    )
    assert "nope" in message
    verbose = run_script(
        LORA,
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--output-dir",
        tmp_path / "run",
        "--target-modules",
        "nope",
        "--verbose",
        check=False,
    )
    assert verbose.returncode == 2 and verbose.stderr.strip().splitlines()[-1] == message


@pytest.mark.parametrize("config_class", [PrepareConfig, TrainConfig, LoraTrainConfig, EvalConfig])
def test_every_command_takes_verbose_and_no_config_keeps_it(config_class):
    config = parse_config(config_class, "", ["--verbose"])
    assert config == parse_config(config_class, "", [])
    assert parse_study_args("", ["--verbose", "--dry-run"]) == StudyConfig(dry_run=True)


def test_quieting_keeps_a_users_own_verbosity(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    for name in (
        "DATASETS_VERBOSITY",
        "HF_HUB_VERBOSITY",
        dependency_logs.VERBOSE_ENVIRONMENT,
        dependency_logs.QUIET_ENVIRONMENT,
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    levels = {library: logging.getLogger(library).level for library in dependency_logs.LIBRARIES}
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    try:
        with warnings.catch_warnings():
            dependency_logs.quiet_dependencies([])
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["DATASETS_VERBOSITY"] == "error"
        assert logging.getLogger("kernels._internals.hf_hub").getEffectiveLevel() == logging.ERROR
    finally:
        for library, level in levels.items():
            logging.getLogger(library).setLevel(level)
        transformers_logging.set_verbosity(verbosity)
