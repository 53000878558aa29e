"""The README and docs/ stay true: every relative link and anchor resolves, every flag named for a command is in that
command's --help, lines stay within 120 columns, the README's commands parse, its quick study needs no network, and
the quick run by hand in docs/ runs offline as written (with its step counts cut).

What already runs the README's quick commands end to end, so this file does not run them again: test_study.py's
`study` fixture runs studies/quick.toml (shortened) through run_study, test_study.py's dry-run test runs
`run_study.py --preset quick --dry-run`, and test_pipeline.py runs the four stages on local files."""

from __future__ import annotations

import argparse
import re
import runpy
import sys
from contextlib import redirect_stdout
from functools import lru_cache
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO_ROOT

from studykit import cli

README = REPO_ROOT / "README.md"
PAGES = [README, REPO_ROOT / "CHANGELOG.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
RESULTS_BLOCK = re.compile(r"<!-- results:start -->.*?<!-- results:end -->", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
WIDTH = 120

# The kit's commands, as the docs name them, and what runs each one's argument parser in this process.
COMMANDS = {
    "study": (cli.study_command, "run_study.py", "studykit-study", "scripts/study.sh"),
    "prepare": (cli.prepare_command, "data/prepare_oasst.py", "studykit-prepare"),
    "train-full": (cli.train_full_command, "training/train_full_ft.py", "studykit-train-full"),
    "train-lora": (cli.train_lora_command, "training/train_lora.py", "studykit-train-lora"),
    "eval": (cli.evaluate_command, "evaluation/perplexity.py", "studykit-eval"),
    "analyze": (cli.analyze_command, "evaluation/analyze.py", "studykit-analyze"),
    "make-tiny-model": ("scripts/make_tiny_model.py", "scripts/make_tiny_model.py"),
    "benchmark": ("bench/benchmark.py", "bench/benchmark.py"),
    "memory": ("bench/memory.py", "bench/memory.py"),
    "loss-kernels": ("bench/loss_kernels.py", "bench/loss_kernels.py"),
    "gpu-check": ("bench/gpu_check.py", "bench/gpu_check.py", "bench/gpu_check.sh"),
    "gpu-wheelhouse": ("bench/gpu_wheelhouse.sh", "bench/gpu_wheelhouse.sh"),
}
# Shell scripts that read options of their own (a bash `case` over the arguments) before or instead of a parser.
SHELL_OPTIONS = {"gpu-check": "bench/gpu_check.sh", "gpu-wheelhouse": "bench/gpu_wheelhouse.sh"}
COMMAND_OF = {name: command for command, (_, *names) in COMMANDS.items() for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# Reading Markdown the way GitHub renders it
# ---------------------------------------------------------------------------------------------------------------------


def prose_of(text: str) -> str:
    """The text outside fenced code blocks and the study's machine-written results block."""
    return FENCE.sub("", RESULTS_BLOCK.sub("", text))


def github_anchor(heading: str) -> str:
    """GitHub's heading id: the rendered text lowercased, punctuation dropped, each space a hyphen."""
    text = LINK.sub(r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    anchors: set[str] = set()
    for line in prose_of(text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = github_anchor(match.group(1))
            count = sum(1 for seen in anchors if re.fullmatch(re.escape(anchor) + r"(-\d+)?", seen))
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def broken_links(path: Path, text: str) -> list[str]:
    """Each relative link whose file, or whose anchor in that file, does not exist."""
    broken = []
    prose = CODE_SPAN.sub("", prose_of(text))
    for _, target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md":
            linked_text = text if linked == path else linked.read_text(encoding="utf-8")
            if anchor not in anchors_of(linked_text):
                broken.append(f"{target}: no heading with that anchor")
    return broken


def command_texts(text: str) -> list[str]:
    """Every command the page shows: each logical line of a shell code block, and each inline code span."""
    texts = []
    for language, body in FENCE.findall(RESULTS_BLOCK.sub("", text)):
        if language in ("", "bash", "sh", "shell", "console"):
            for line in body.replace("\\\n", " ").splitlines():
                texts.append(re.sub(r"(^|\s)#.*", "", line))
    texts += [span for _, span in CODE_SPAN.findall(prose_of(text))]
    return texts


def named_flags(text: str) -> list[tuple[str | None, str]]:
    """(command, flag) for each flag a page names: a flag after one of the kit's commands belongs to that command (a
    wrapper's own flags, as `accelerate launch`'s, come before it); a code span that starts with a flag names a flag
    of some kit command (None); a span or line that starts with another program (pip, accelerate, an error message's
    words) is not the kit's to check."""
    named = []
    for command_text in command_texts(text):
        for segment in re.split(r"&&|\|\||[|;]", command_text):
            words = segment.split()
            position = next((i for i, word in enumerate(words) if word in COMMAND_OF), None)
            if position is not None:
                command = COMMAND_OF[words[position]]
                named += [(command, flag) for flag in FLAG.findall(" ".join(words[position + 1 :]))]
            elif words and words[0].startswith("--"):
                named += [(None, flag) for flag in FLAG.findall(segment)]
    return named


# ---------------------------------------------------------------------------------------------------------------------
# The commands' own parsers, run in this process
# ---------------------------------------------------------------------------------------------------------------------


class _ParserReached(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@lru_cache(maxsize=None)
def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser a command builds, taken at the moment it would parse `--help`: the real entry point runs up to there
    (a console command's function, or a script as `python script` runs it) and nothing after."""
    entry = COMMANDS[command][0]

    def reached(parser, *args, **kwargs):
        raise _ParserReached(parser)

    # `python script` puts the script's folder first on sys.path (bench/memory.py imports its neighbour
    # tensor_memory.py from there); runpy.run_path does not, so the folder is put there as python would.
    script_folder = [] if callable(entry) else [str((REPO_ROOT / entry).parent)]
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", reached):
        with (
            mock.patch.object(sys, "argv", [str(entry), "--help"]),
            mock.patch.object(sys, "path", [*script_folder, *sys.path]),
            redirect_stdout(StringIO()),
        ):
            try:
                entry() if callable(entry) else runpy.run_path(str(REPO_ROOT / entry), run_name="__main__")
            except _ParserReached as found:
                return found.parser
    raise AssertionError(f"{command} never parsed its arguments")


def shell_options(command: str) -> set[str]:
    """The long options a shell script's `case` patterns take (`--cpu-smoke|--budget=*)`), if it reads any."""
    if command not in SHELL_OPTIONS:
        return set()
    text = (REPO_ROOT / SHELL_OPTIONS[command]).read_text(encoding="utf-8")
    patterns = re.findall(r"^\s*([\w|=*-]+)\)", text, re.M)
    return {option.removesuffix("=*") for pattern in patterns for option in pattern.split("|") if option[:2] == "--"}


def flags_of(command: str) -> set[str]:
    """The flags `command --help` lists (hidden internal ones left out), and those its shell script reads itself."""
    if str(COMMANDS[command][0]).endswith(".sh"):
        return shell_options(command)
    return shell_options(command) | {
        option
        for action in parser_of(command)._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--")
    }


@lru_cache(maxsize=1)
def every_kit_flag() -> frozenset[str]:
    return frozenset().union(*(flags_of(command) for command in COMMANDS))


def unknown_flags(text: str) -> list[str]:
    unknown = []
    for command, flag in named_flags(text):
        known = flags_of(command) if command else every_kit_flag()
        if flag not in known:
            unknown.append(f"{flag} (not a flag of {command or 'any kit command'})")
    return sorted(set(unknown))


def wide_lines(text: str) -> list[str]:
    return [
        f"line {number}: {len(line)} columns" for number, line in enumerate(text.splitlines(), 1) if len(line) > WIDTH
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", PAGES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_every_flag_named_for_a_command_is_in_its_help(path):
    assert unknown_flags(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", PAGES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_lines_stay_within_120_columns(path):
    """The study's results block is left out: the study writes it."""
    assert wide_lines(RESULTS_BLOCK.sub("", path.read_text(encoding="utf-8"))) == []


def test_the_readme_stays_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    assert text.count("<!-- results:start -->") == text.count("<!-- results:end -->") == 1
    assert all((REPO_ROOT / "docs" / name).is_file() for name in re.findall(r"\(docs/([\w.-]+\.md)", text))


def test_the_module_map_names_every_module_in_its_layer():
    """docs/architecture.md's map is tests/test_structure.py's LAYERS: a module added there is added to the page."""
    from test_structure import LAYERS

    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    mapped = {
        int(layer): re.findall(r"^\s+- `(\w+)`:", body, re.M)
        for layer, body in re.findall(r"^- \*\*Layer (\d+)\*\*\n((?:\s+.*\n)+)", text, re.M)
    }
    assert mapped == {number: modules for number, modules in enumerate(LAYERS, 1)}


def test_the_checks_catch_a_broken_link_anchor_flag_and_width(tmp_path):
    """Each check fails on a mistake of its kind, so the tests above can fail."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## The `--context` flag (prompts)\n")
    text = (
        "# Page\n\n## A section, here\n\n"
        "[ok](other.md#the---context-flag-prompts) [ok](#a-section-here) [ok](other.md) [web](https://example.com)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad here](#a-section-there)\n"
        "`[not a link](inside-a-span.md)`\n\n"
        "```bash\npython training/train_lora.py --rank 8 --rnak 16   # --not-checked in a comment\n"
        "accelerate launch --num_processes 2 training/train_full_ft.py --batch-size 8\n```\n\n"
        "`run_study.py --preset quick --presets quick`, `--lr` and `--learning-rate`, `pip install --upgrade x`\n"
        + "x" * 121
        + "\n"
    )
    page.write_text(text)
    assert broken_links(page, text) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading with that anchor",
        "#a-section-there: no heading with that anchor",
    ]
    assert unknown_flags(text) == [
        "--learning-rate (not a flag of any kit command)",
        "--presets (not a flag of study)",
        "--rnak (not a flag of train-lora)",
    ]
    assert wide_lines(text) == [f"line {len(text.splitlines())}: 121 columns"]


def test_a_flag_of_one_command_is_not_taken_for_another():
    assert "--rank" in flags_of("train-lora") and "--rank" not in flags_of("train-full")
    assert unknown_flags("`python training/train_full_ft.py --rank 8`") == ["--rank (not a flag of train-full)"]
    assert "--cpu-smoke" in flags_of("gpu-check") and "--no-readme" in flags_of("study")
    assert "--verbose" in flags_of("analyze") and "--dry-run" not in flags_of("analyze")
    assert "--wheelhouse" in flags_of("gpu-check") and "--with-pyarrow" not in flags_of("gpu-check")
    assert {"--python-version", "--platform", "--with-pyarrow"} <= flags_of("gpu-wheelhouse")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, arguments) for each kit command the README shows."""
    found = []
    for command_text in command_texts(README.read_text(encoding="utf-8")):
        words = command_text.split()
        position = next((i for i, word in enumerate(words) if word in COMMAND_OF), None)
        if position is not None:
            found.append((COMMAND_OF[words[position]], words[position + 1 :]))
    return found


def test_the_readme_commands_parse_and_their_settings_pass():
    """Each command line the README shows is accepted by its command's parser and checks, as the command reads it."""
    from studykit.config import LoraTrainConfig, PrepareConfig, TrainConfig, parse_config
    from studykit.study import parse_study_args
    from studykit.study_config import EvalConfig

    parse = {
        "study": lambda argv: parse_study_args("", argv),
        "prepare": lambda argv: parse_config(PrepareConfig, "", argv),
        "train-full": lambda argv: parse_config(TrainConfig, "", argv),
        "train-lora": lambda argv: parse_config(LoraTrainConfig, "", argv),
        "eval": lambda argv: parse_config(EvalConfig, "", argv),
    }
    commands = readme_commands()
    assert {command for command, _ in commands} >= set(parse), "the README shows every stage and the study"
    for command, argv in commands:
        # The analysis and the bench scripts have no settings object: their own parser is what reads the line.
        parse.get(command, lambda argv: parser_of(command).parse_args(argv))(argv)


def test_the_readme_quick_study_needs_no_network():
    """The README's offline promise: `--preset quick` builds its model and reads only files the repository ships."""
    from studykit.study import parse_study_args
    from studykit.study_file import load_study, study_path

    quick = [argv for command, argv in readme_commands() if command == "study" and "--preset" in argv]
    assert quick, "the README shows the quick preset"
    for argv in quick:
        config = parse_study_args("", argv)
        study = load_study(study_path(config), config.output_dir, config.readme, config.seeds, config.overrides)
        assert study.tiny_model is not None, "the quick study builds its own model"
        assert (REPO_ROOT / study.prepare.data_file).is_file()
        assert study.eval.extra_eval is None or (REPO_ROOT / study.eval.extra_eval).is_file()
        assert study.readme is None, "the quick study never rewrites a README"


def quick_run_by_hand() -> list[str]:
    """The docs' quick run by hand: the shell block that builds the tiny model, one command a line."""
    for path in PAGES:
        for language, body in FENCE.findall(path.read_text(encoding="utf-8")):
            if "scripts/make_tiny_model.py" in body:
                lines = body.replace("\\\n", " ").splitlines()
                return [command for command in (re.sub(r"(^|\s)#.*", "", line).strip() for line in lines) if command]
    raise AssertionError("no page shows the quick run by hand (scripts/make_tiny_model.py)")


# Appended to the block's commands (argparse keeps the last value) so the run takes seconds; every other word is the
# docs' own.
SHORTER = {
    "make-tiny-model": ["--pretrain-steps", "2"],
    "train-full": ["--max-steps", "2"],
    "train-lora": ["--max-steps", "2"],
}


def test_the_quick_run_by_hand_runs_offline_as_written(in_process, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    commands = quick_run_by_hand()
    assert [command.split()[1] for command in commands] == [
        "scripts/make_tiny_model.py",
        "data/prepare_oasst.py",
        "training/train_full_ft.py",
        "training/train_lora.py",
        "evaluation/perplexity.py",
    ]
    for command in commands:
        words = command.replace(".quick/", f"{tmp_path}/.quick/").split()
        assert words[0] == "python"
        result = in_process(words[1], *words[2:], *SHORTER.get(COMMAND_OF[words[1]], []))
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert (tmp_path / ".quick" / "results" / "perplexity.json").is_file()
