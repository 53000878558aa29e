"""The code's shape, checked: studykit's modules import each other one way only, the two training scripts differ only
in the method they name, and a study retrains a run only when code that training runs has changed."""

import ast
import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ONE_RUN_TRAINING, REPO_ROOT, one_run_study

from studykit import runtime

# studykit's modules from the bottom up: a module imports only modules of its own layer or below, and never one that
# imports it back. A new module goes into the lowest layer that holds everything it imports.
LAYERS = [
    ["errors", "dependency_logs", "grid_extension", "learning_curves", "subsets"],
    ["io", "hub", "hub_upload", "locks", "settings"],
    ["config", "study_config", "analysis_config"],
    [
        "runtime",
        "data",
        "oasst",
        "modeling",
        "loss",
        "batching",
        "metrics",
        "response_scores",
        "tiny",
        "sharded",
        "statistics",
        "figures",
        "optimizers",
        "token_scoring",
        "gap_buckets",
        "weight_change",
        "verdict",
        "analysis_figures",
        "bootstrap_replicates",
        "analysis_numbers",
        "analysis_markdown",
    ],
    ["methods", "run_state", "study_tables"],
    ["run_dir", "model_card", "checkpointing", "memory", "safeguards", "trackers"],
    ["memory_fit"],
    ["trainer", "prepare", "evaluate"],
    ["study_file"],
    ["samples", "comparison", "falling_behind"],
    ["report_markdown"],
    ["report"],
    ["study_state"],
    ["study_launch", "analysis_parts", "analysis"],
    ["study_submitit", "study_plan"],
    ["study", "cli"],
]
LAYER_OF = {module: index for index, modules in enumerate(LAYERS) for module in modules}


def imports_of(module: str) -> set[str]:
    return {name.split(".", 1)[1] for name in runtime.studykit_imports(f"studykit.{module}")} - {module}


def test_every_module_has_a_layer():
    modules = {path.stem for path in (REPO_ROOT / "studykit").glob("*.py") if path.stem != "__init__"}
    assert modules == set(LAYER_OF), (
        f"add {sorted(modules - set(LAYER_OF))} to LAYERS; drop {sorted(set(LAYER_OF) - modules)}"
    )


def test_imports_run_one_way():
    upward = [
        f"{module} (layer {LAYER_OF[module]}) imports {imported} (layer {LAYER_OF[imported]})"
        for module in LAYER_OF
        for imported in sorted(imports_of(module))
        if LAYER_OF[imported] > LAYER_OF[module]
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path that ends where it starts, or [] when there is none."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return path[path.index(neighbour) :] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour, path + [neighbour])):
                return cycle
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return []


def test_no_module_imports_itself_through_others():
    graph = {module: imports_of(module) for module in LAYER_OF}
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_training_scripts_differ_only_in_their_method():
    full, lora = (
        (REPO_ROOT / "training" / name).read_text().splitlines() for name in ("train_full_ft.py", "train_lora.py")
    )
    changed = [
        line
        for line in difflib.unified_diff(full, lora, lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    docstrings = [line for line in changed if line[1:].startswith('"""')]
    calls = [line[1:].strip() for line in changed if line not in docstrings]
    assert sorted(calls) == ['train_method("full")', 'train_method("lora")'], changed


def test_the_scripts_edit_no_sys_path_and_say_when_the_kit_is_not_installed(tmp_path):
    """The scripts run the installed package; run by a Python without it, each says how to install it."""
    scripts = [
        "data/prepare_oasst.py",
        "training/train_full_ft.py",
        "training/train_lora.py",
        "evaluation/perplexity.py",
        "run_study.py",
    ]
    for script in scripts:
        assert "sys.path" not in (REPO_ROOT / script).read_text(), script
        if script == "run_study.py":
            continue  # beside studykit/, Python finds the package from its own directory, installed or not
        # -S: no site-packages, so no installed studykit; run from elsewhere, so the repository is not on the path.
        result = subprocess.run(
            [sys.executable, "-S", str(REPO_ROOT / script), "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", "")},
        )
        assert result.returncode == 1 and result.stderr.startswith("error: the studykit package is not installed"), (
            result
        )


# ---------------------------------------------------------------------------------------------------------
# Retrain only when training could change
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of studykit whose files a test may edit; the code versions are computed from it."""
    shutil.copytree(REPO_ROOT / "studykit", tmp_path / "studykit", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runtime, "REPO_ROOT", tmp_path)
    runtime.stage_code_version.cache_clear()
    yield tmp_path / "studykit"
    runtime.stage_code_version.cache_clear()


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    runtime.stage_code_version.cache_clear()


def test_docstrings_comments_and_help_texts_leave_the_training_code_version_alone(package_copy):
    before = {stage: runtime.stage_code_version(f"studykit.{stage}") for stage in ("trainer", "report")}
    loss = package_copy / "loss.py"
    docstring = ast.get_docstring(ast.parse(loss.read_text()), clean=False)
    edit(loss, docstring.splitlines()[0], "A docstring rewritten from scratch.")
    edit(loss, "# Every chunk reads and writes", "# A comment rewritten: every chunk reads and writes")
    edit(package_copy / "config.py", '"peak learning rate"', '"the peak learning rate, reworded"')
    edit(package_copy / "config.py", '"Hub": ("push_to_hub",),', '"Upload": ("push_to_hub",),')  # --help sections
    edit(package_copy / "methods.py", '"Stage 3: LoRA.', '"Stage 3: LoRA adapters.')  # a command's description
    edit(package_copy / "comparison.py", "def budget_differences(", "def budget_differences_renamed(")
    assert runtime.stage_code_version("studykit.trainer") == before["trainer"]
    assert runtime.stage_code_version("studykit.report") != before["report"], "the report's own code changed"


def test_a_change_to_the_loss_changes_the_training_code_version(package_copy):
    before = runtime.stage_code_version("studykit.trainer")
    edit(package_copy / "loss.py", 'LOGIT_CHUNK_BYTES = {"cpu": 128 * 2**20', 'LOGIT_CHUNK_BYTES = {"cpu": 64 * 2**20')
    assert runtime.stage_code_version("studykit.trainer") != before


# Real code, not a docstring: a function and a module-level constant, appended where nothing reads them and a change
# inside an existing function, so the edit would move any fingerprint that hashes the file.
PRESENTATION_EDITS = {
    "statistics.py": ("import numpy as np", "import numpy as np\n\nEDITED_CONFIDENCE = 0.9"),
    "figures.py": ("import math", "import math\n\nEDITED_DPI = 300"),
    "report.py": ("from __future__ import annotations", "from __future__ import annotations\n\nEDITED_DIGITS = 3"),
    "comparison.py": ("import math", "import math\n\nEDITED_RESAMPLES = 99"),
    "report_markdown.py": ("from pathlib import Path", "from pathlib import Path\n\nEDITED_WIDTH = 80"),
    "model_card.py": ("import math", "import math\n\nEDITED_LICENSE = 'mit'"),
    "hub_upload.py": ("import fnmatch", "import fnmatch\n\nEDITED_PATTERN = '*.bin'"),
    "trackers.py": ("import json", "import json\n\nEDITED_PROJECT = 'edited'"),
}


def test_editing_the_report_figures_statistics_or_card_changes_no_training_or_evaluation(package_copy):
    stages = ("studykit.trainer", "studykit.evaluate")
    before = {stage: runtime.stage_code_version(stage) for stage in stages}
    report_before = runtime.stage_code_version("studykit.report")
    for name, (old, new) in PRESENTATION_EDITS.items():
        edit(package_copy / name, old, new + "\n\n\ndef edited_helper(value):\n    return value * 2\n")
    assert {stage: runtime.stage_code_version(stage) for stage in stages} == before
    assert runtime.stage_code_version("studykit.report") != report_before, "the report's own code changed"
    edit(package_copy / "loss.py", 'LOGIT_CHUNK_BYTES = {"cpu": 128 * 2**20', 'LOGIT_CHUNK_BYTES = {"cpu": 64 * 2**20')
    after = {stage: runtime.stage_code_version(stage) for stage in stages}
    assert all(after[stage] != before[stage] for stage in stages), "the loss decides weights and scored numbers"


def test_the_outcome_neutral_modules_cannot_touch_a_tensor():
    """What the fingerprints leave out must not be able to change a weight: it imports no torch, no model library and
    no studykit module outside the neutral set that training or evaluation would not hash anyway."""
    weight_libraries = {"torch", "transformers", "peft", "accelerate", "bitsandbytes"}
    training = runtime.stage_modules("studykit.trainer") | runtime.stage_modules("studykit.evaluate")
    for module in runtime.OUTCOME_NEUTRAL_MODULES:
        tree = ast.parse(runtime._module_path(module).read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & weight_libraries, f"{module} imports {sorted(imported & weight_libraries)}"
        kit = runtime.studykit_imports(module) - runtime.OUTCOME_NEUTRAL_MODULES
        assert kit <= training, f"{module} imports {sorted(kit - training)}, which no training or evaluation hashes"
    assert not runtime.OUTCOME_NEUTRAL_MODULES & training


def test_the_study_retrains_when_training_code_changes_and_only_reports_when_report_code_does(tmp_path, monkeypatch):
    from studykit import study_state
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    config = StudyConfig(config=str(one_run_study(tmp_path / "study.toml", steps=2)), output_dir=str(tmp_path / "out"))
    assert run_study(config)["trained"] == [ONE_RUN_TRAINING]
    version = study_state.stage_code_version

    monkeypatch.setattr(
        study_state,
        "stage_code_version",
        lambda module: version(module) + ("-edited" if module == "studykit.report" else ""),
    )
    report_only = run_study(config)
    assert report_only["kept"] == [ONE_RUN_TRAINING] and not report_only["evaluated"] and report_only["reported"]

    monkeypatch.setattr(
        study_state,
        "stage_code_version",
        lambda module: version(module) + ("-edited" if module == "studykit.trainer" else ""),
    )
    retrained = run_study(config)
    assert retrained["trained"] == [ONE_RUN_TRAINING] and retrained["evaluated"]
    record = (tmp_path / "out" / "checkpoints" / ONE_RUN_TRAINING / "run.json").read_text()
    assert f'"code": "{runtime.code_version()}"' in record, "run.json records the whole kit's code version"
