"""Bad input gets one sentence and a non-zero exit, and changes no file; unsafe files are never loaded; a loss
that stays NaN stops the run with the last good checkpoint intact.

Every bad input runs the real command: its script, its argument parsing, its exit. A few run in a subprocess, to
show the real interpreter behaves the same; the others run the same script in this process (`in_process`), since
importing torch, transformers, datasets and accelerate costs each subprocess several CPU seconds.
"""

import json
import math
import os
import pickle
import shutil

import pytest
import torch
from conftest import (
    EVALUATE,
    FULL,
    LORA,
    PREPARE,
    QUIET,
    build_tiny_model,
    refused,
    train_in_process,
    write_oasst_trees,
)
from safetensors.torch import load_file

from studykit import checkpointing
from studykit.errors import UserError
from studykit.io import PARTIAL_MARKER
from studykit.loss import BatchNLL
from studykit.run_dir import RUN_LOG, RUN_RECORD, read_run_log, resumable_checkpoints


def train_args(model, data, output_dir, *extra):
    return [
        "--model",
        model,
        "--data-dir",
        data,
        "--output-dir",
        output_dir,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        *extra,
    ]


class RunsCode:
    """Unpickling this runs a shell command: the file that command creates proves whether a loader ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------------------
# Stage 1: prepare
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def existing_output(tmp_path_factory, processed_dir):
    """A processed dataset already in place: a refused prepare must leave it exactly as it was."""
    output = tmp_path_factory.mktemp("prepared") / "data"
    shutil.copytree(processed_dir, output)
    return output


def test_corrupt_jsonl_lines_are_named_and_can_be_skipped(in_process, tmp_path, gpt2_tokenizer_dir, existing_output):
    lines = write_oasst_trees(tmp_path / "trees.jsonl", tree_count=10).read_text().splitlines()
    lines[2], lines[6] = lines[2][:40], "not json at all"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    args = ["--data-file", broken, "--tokenizer", gpt2_tokenizer_dir, "--seq-len", "64", "--test-fraction", "0.2"]
    message = refused(
        PREPARE, *args, "--output-dir", existing_output, watch=[existing_output.parent], runner=in_process
    )
    assert "2 corrupt line(s) (line 3, 7)" in message and "--skip-bad-lines" in message

    assert in_process(PREPARE, *args, "--output-dir", tmp_path / "out", "--skip-bad-lines").returncode == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["bad_lines_skipped"] == [3, 7]
    assert sum(meta["sequences"].values()) == 8 * 3


def test_a_file_that_is_not_an_oasst_export_is_refused(in_process, tmp_path, gpt2_tokenizer_dir, existing_output):
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "add", "output": "2"}\n' * 3)
    message = refused(
        PREPARE,
        "--data-file",
        other,
        "--tokenizer",
        gpt2_tokenizer_dir,
        "--output-dir",
        existing_output,
        watch=[existing_output.parent],
        runner=in_process,
    )
    assert "is not an OASST export" in message and "instruction" in message


def test_nothing_left_after_the_filters_is_refused(in_process, oasst_trees_file, gpt2_tokenizer_dir, existing_output):
    message = refused(
        PREPARE,
        "--data-file",
        oasst_trees_file,
        "--tokenizer",
        gpt2_tokenizer_dir,
        "--output-dir",
        existing_output,
        "--lang",
        "xx",
        "--test-fraction",
        "0.2",
        watch=[existing_output.parent],
        runner=in_process,
    )
    assert "messages are left after the filters" in message and "--lang" in message


def test_seq_len_above_the_tokenizers_context_is_refused(
    in_process, oasst_trees_file, gpt2_tokenizer_dir, existing_output
):
    message = refused(
        PREPARE,
        "--data-file",
        oasst_trees_file,
        "--tokenizer",
        gpt2_tokenizer_dir,
        "--output-dir",
        existing_output,
        "--seq-len",
        "2048",
        watch=[existing_output.parent],
        runner=in_process,
    )
    assert "--seq-len 2048 exceeds the context" in message and "(1024 tokens)" in message


# ---------------------------------------------------------------------------------------------------------
# Stages 2 and 3: training
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["missing", "empty", "crashed"])
def test_missing_or_empty_data_directory_names_the_stage_that_makes_it(state, in_process, tmp_path, tiny_model_dir):
    data = tmp_path / "processed"
    if state == "empty":
        data.mkdir()
    if state == "crashed":
        # What a prepare killed before its rename leaves: the staging directory, never loaded.
        (tmp_path / f"processed{PARTIAL_MARKER}4242" / "train").mkdir(parents=True)
    runner = None if state == "missing" else in_process
    message = refused(FULL, *train_args(tiny_model_dir, data, tmp_path / "run"), watch=[tmp_path], runner=runner)
    assert f"no processed dataset in {data}" in message and "python data/prepare_oasst.py" in message
    assert ("unfinished write" in message) == (state == "crashed")


def test_data_longer_than_the_models_context_is_refused(in_process, tmp_path, gpt2_tokenizer, processed_dir):
    short_model = build_tiny_model(tmp_path / "short-context", gpt2_tokenizer, n_positions=32)
    message = refused(
        FULL,
        *train_args(short_model, processed_dir, tmp_path / "run"),
        watch=[tmp_path, processed_dir],
        runner=in_process,
    )
    assert "--seq-len 64 exceeds the model's context of 32" in message


def test_data_from_another_tokenizer_is_refused(in_process, tmp_path, small_vocab_inputs, processed_dir):
    message = refused(
        FULL,
        *train_args(small_vocab_inputs["model"], processed_dir, tmp_path / "run"),
        watch=[tmp_path, processed_dir],
        runner=in_process,
    )
    assert "was tokenized with" in message and "prepare the data again" in message


@pytest.mark.parametrize("target", ["attn.q_proj", "act", "attn_dropout", "0"])
def test_lora_targets_that_match_nothing_are_refused(target, in_process, tmp_path, small_vocab_inputs):
    """A name that matches no module, or only modules LoRA cannot adapt (an activation, dropout, a whole block)."""
    args = train_args(
        small_vocab_inputs["model"], small_vocab_inputs["data"], tmp_path / "run", "--target-modules", target
    )
    message = refused(LORA, *args, watch=[tmp_path], runner=in_process)
    assert "match nothing" in message and f"['{target}']" in message
    suggested = message.split("such as ")[1]
    assert (
        "attn.c_attn" in suggested
        and "mlp.c_proj" in suggested
        and "'act'" not in suggested
        and "dropout" not in suggested
    )


def test_a_lora_adapter_passed_as_the_base_model_is_refused(in_process, tmp_path, small_vocab_inputs, lora_checkpoints):
    """transformers would load the adapter's base with the adapter applied and train on top of it, without a word."""
    lora_adapter = lora_checkpoints / "lora_r8"
    for script in (FULL, LORA):
        message = refused(
            script,
            *train_args(lora_adapter, small_vocab_inputs["data"], tmp_path / "run"),
            watch=[tmp_path, lora_adapter],
            runner=in_process,
        )
        assert "is a LoRA adapter, not a base model" in message and "--model" in message


@pytest.mark.parametrize("flags", [["--rank", "0"], ["--alpha", "-1"]])
def test_non_positive_lora_rank_or_alpha_is_refused(flags, in_process, tmp_path, small_vocab_inputs):
    runner = None if flags[0] == "--rank" else in_process
    message = refused(
        LORA,
        *train_args(small_vocab_inputs["model"], small_vocab_inputs["data"], tmp_path / "run", *flags),
        watch=[tmp_path],
        runner=runner,
    )
    assert "positive rank and alpha" in message


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        (FULL, ["--lr", "nan"], "--lr must be above 0 (got nan)"),
        (FULL, ["--epochs", "nan", "--max-steps", "none"], "--epochs must be above 0"),
        (FULL, ["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
        (FULL, ["--warmup-ratio", "2"], "--warmup-ratio must be from 0 to 1"),
        (FULL, ["--max-grad-norm", "-1"], "--max-grad-norm must be 0 (no clipping) or more"),
        (FULL, ["--peak-tflops", "inf"], "--peak-tflops must be above 0"),
        (LORA, ["--dropout", "1.5"], "--dropout must be from 0 to below 1"),
        (LORA, ["--alpha", "nan"], "positive rank and alpha"),
        (FULL, ["--lr", "-1e-3"], "argument --lr: expected one argument (see train_full_ft.py --help)"),
        (FULL, ["--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate 1e-3"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_anything_is_written(
    script, flags, expected, in_process, tmp_path, small_vocab_inputs
):
    """NaN, inf and out-of-range values once reached torch (a traceback) or trained wrongly without a word (a negative
    clipping norm climbs the loss); a mistyped flag printed argparse's usage block instead of one error line."""
    message = refused(
        script,
        *train_args(small_vocab_inputs["model"], small_vocab_inputs["data"], tmp_path / "run", *flags),
        watch=[tmp_path],
        runner=in_process,
    )
    assert expected in message


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_vocab_inputs):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_in_process("full", small_vocab_inputs, run_dir, max_steps=2)
    return run_dir


def test_a_directory_holding_another_run_is_refused(in_process, finished_run, small_vocab_inputs):
    message = refused(
        FULL, *train_args(small_vocab_inputs["model"], small_vocab_inputs["data"], finished_run), watch=[finished_run]
    )
    assert "already holds a run" in message and "--overwrite" in message and "--resume" in message
    message = refused(
        FULL,
        *train_args(small_vocab_inputs["model"], small_vocab_inputs["data"], finished_run, "--resume"),
        watch=[finished_run],
        runner=in_process,
    )
    assert "finished run" in message


def test_overwrite_with_bad_input_keeps_the_old_run(in_process, finished_run, small_vocab_inputs, tmp_path):
    args = train_args(small_vocab_inputs["model"], tmp_path / "missing-data", finished_run, "--overwrite")
    assert "no processed dataset" in refused(FULL, *args, watch=[finished_run], runner=in_process)


def test_a_directory_holding_other_files_is_never_written_into(in_process, small_vocab_inputs):
    """E.g. --output-dir pointing at the base model: its weights would be overwritten by the final save."""
    model = small_vocab_inputs["model"]
    message = refused(
        FULL, *train_args(model, small_vocab_inputs["data"], model, "--overwrite"), watch=[model], runner=in_process
    )
    assert "is not empty and holds no training run" in message


def test_an_unwritable_output_directory_is_refused_before_training(in_process, tmp_path, small_vocab_inputs):
    # Tests run as root, which ignores permission bits: a path under a regular file cannot be created by anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    message = refused(
        FULL,
        *train_args(small_vocab_inputs["model"], small_vocab_inputs["data"], blocker / "run"),
        watch=[tmp_path],
        runner=in_process,
    )
    assert f"cannot write to {blocker / 'run'}" in message and "--output-dir" in message


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, small_vocab_inputs):
    """A run that died after its step-2 checkpoint (its run.json never written): --resume continues it."""
    run_dir = tmp_path_factory.mktemp("crashed") / "run"
    train_in_process("full", small_vocab_inputs, run_dir, max_steps=3, save_every=1, batch_size=2, grad_accum=1)
    (run_dir / RUN_RECORD).unlink()
    return run_dir


def resume_args(inputs, run_dir):
    return [
        "--model",
        inputs["model"],
        "--data-dir",
        inputs["data"],
        "--output-dir",
        run_dir,
        "--max-steps",
        "3",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "3",
        "--lr",
        "1e-3",
        "--resume",
    ]


def test_resume_from_a_checkpoint_without_weights_is_refused(in_process, crashed_run, small_vocab_inputs, tmp_path):
    run_dir = shutil.copytree(crashed_run, tmp_path / "run")
    latest = resumable_checkpoints(run_dir)[-1]
    (latest / "model.safetensors").unlink()
    message = refused(FULL, *resume_args(small_vocab_inputs, run_dir), watch=[run_dir], runner=in_process)
    assert f"the checkpoint {latest} holds no weights" in message and "delete it" in message


def test_resume_with_other_settings_is_refused(in_process, crashed_run, small_vocab_inputs, tmp_path):
    """The saved optimizer state would silently override a new --lr; a new --max-steps would change the schedule."""
    run_dir = shutil.copytree(crashed_run, tmp_path / "run")
    args = resume_args(small_vocab_inputs, run_dir)
    args[args.index("--lr") + 1] = "5e-4"
    args[args.index("--max-steps") + 1] = "40"
    message = refused(FULL, *args, watch=[run_dir], runner=in_process)
    assert "belongs to a run with other settings" in message and "--lr (was 0.001, now 0.0005)" in message
    assert "--max-steps (was 3, now 40)" in message and "the command that started the run plus --resume" in message


def test_resume_never_unpickles_code_from_a_checkpoint(in_process, crashed_run, small_vocab_inputs, tmp_path):
    run_dir = shutil.copytree(crashed_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    latest = resumable_checkpoints(run_dir)[-1]
    (latest / "optimizer.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    message = refused(FULL, *resume_args(small_vocab_inputs, run_dir), watch=[run_dir], runner=in_process)
    assert "optimizer.pt holding more than tensors" in message
    assert not marker.exists()


def test_pickled_model_weights_are_never_loaded(in_process, tmp_path, small_vocab_inputs):
    model = tmp_path / "pickled-model"
    shutil.copytree(small_vocab_inputs["model"], model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    message = refused(
        FULL, *train_args(model, small_vocab_inputs["data"], tmp_path / "run"), watch=[tmp_path], runner=in_process
    )
    assert "holds no .safetensors weights (only pytorch_model.bin" in message
    assert not marker.exists()


def test_model_code_from_a_directory_never_runs_without_trust_remote_code(in_process, tmp_path, small_vocab_inputs):
    model = tmp_path / "custom-model"
    shutil.copytree(small_vocab_inputs["model"], model)
    marker = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    # A model type transformers does not know: only the directory's own code could build it.
    config["model_type"] = "custom-gpt"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (model / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    args = train_args(model, small_vocab_inputs["data"], tmp_path / "run", "--tokenizer", small_vocab_inputs["model"])
    message = refused(FULL, *args, watch=[tmp_path], runner=in_process)
    assert "--trust-remote-code" in message
    assert not marker.exists()


def test_an_absurd_learning_rate_stops_with_a_clear_message_and_no_run(in_process, tmp_path, small_vocab_inputs):
    run_dir = tmp_path / "run"
    args = train_args(
        small_vocab_inputs["model"], small_vocab_inputs["data"], run_dir, "--lr", "1e30", "--save-every", "1"
    )
    args[args.index("--max-steps") + 1] = "20"
    result = in_process(FULL, *args, env=QUIET)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the training loss was NaN or inf for 3 steps in a row") and "lower --lr" in line
    assert not (run_dir / RUN_RECORD).exists()
    # Its only checkpoint holds the weights that gave NaN: set aside, so --resume never picks it.
    assert resumable_checkpoints(run_dir) == []
    assert (run_dir / "resume" / "step-000001.diverged").is_dir()


def test_a_loss_that_stays_nan_keeps_the_last_good_checkpoint(tmp_path, small_vocab_inputs, monkeypatch):
    from studykit import trainer

    real_nll, calls = trainer.batch_nll, []

    def nan_from_step_five(model, batch, autocast):
        calls.append(1)
        nll = real_nll(model, batch, autocast)
        return BatchNLL(nll.total * math.nan, nll.per_sequence) if len(calls) >= 5 else nll

    monkeypatch.setattr(trainer, "batch_nll", nan_from_step_five)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train_in_process("full", small_vocab_inputs, run_dir, max_steps=10, grad_accum=1, save_every=1, keep=1)
    message = str(error.value)
    # Steps 5-7 are NaN; the weights after step 4 gave the first of them, so checkpoint 4 is set aside.
    assert "NaN or inf for 3 steps in a row (steps 5-7)" in message
    assert f"the last good checkpoint is {run_dir / 'resume' / 'step-000003'}" in message
    assert sorted(p.name for p in (run_dir / "resume").iterdir()) == ["step-000003", "step-000004.diverged"]
    assert all(
        torch.isfinite(t).all() for t in load_file(run_dir / "resume" / "step-000003" / "model.safetensors").values()
    )
    log = read_run_log(run_dir / RUN_LOG)
    assert [entry["skipped_steps"] for entry in log] == [0, 0, 0, 0, 1, 2]
    assert not (run_dir / RUN_RECORD).exists()


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient overflows, as in an fp16 overflow step."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient):
        return gradient * math.inf


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_overflowing_step_is_skipped_counted_and_the_run_goes_on(
    precision, tmp_path, small_vocab_inputs, monkeypatch, request
):
    """fp16: the loss scaler skips the step; fp32/bf16 (no scaler): the trainer skips it on the non-finite norm."""
    from studykit import trainer

    if precision == "fp16":
        request.getfixturevalue("fp16_mixed_precision")

    real_nll, calls = trainer.batch_nll, []

    def overflow_at_step_two(model, batch, autocast):
        calls.append(1)
        nll = real_nll(model, batch, autocast)
        return BatchNLL(InfiniteGradient.apply(nll.total), nll.per_sequence) if len(calls) == 2 else nll

    monkeypatch.setattr(trainer, "batch_nll", overflow_at_step_two)
    record = train_in_process(
        "full",
        small_vocab_inputs,
        tmp_path / "run",
        max_steps=4,
        grad_accum=1,
        precision=precision,
        save_every=1,
        keep=3,
    )
    log = read_run_log(tmp_path / "run" / RUN_LOG)
    if precision == "fp32":
        assert [entry["skipped_steps"] for entry in log] == [0, 1, 1, 1]
    else:
        # The scaler halved its scale at the overflow, and each checkpoint keeps the scale a resumed run goes on with.
        scales = [
            checkpointing._load_tensors(path / "scaler.pt")["scale"] for path in resumable_checkpoints(tmp_path / "run")
        ]
        assert len(scales) == 3 and scales[1] == scales[0] / 2
    assert record["precision"] == precision
    assert record["skipped_steps"] >= 1 and log[-1]["skipped_steps"] == record["skipped_steps"]
    assert record["steps"] == 4 and math.isfinite(record["final_dev_loss"])
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "model.safetensors").values())


# ---------------------------------------------------------------------------------------------------------
# Stage 4: evaluation
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_checkpoints(tmp_path_factory, small_vocab_inputs):
    checkpoints = tmp_path_factory.mktemp("eval") / "checkpoints"
    train_in_process("lora", small_vocab_inputs, checkpoints / "lora_r8", max_steps=1, grad_accum=1)
    return checkpoints


def test_an_adapter_is_never_applied_to_another_base_model(in_process, lora_checkpoints, small_vocab_inputs, tmp_path):
    from transformers import AutoTokenizer

    # Same shapes and tokenizer, other weights: loading would succeed and silently score the wrong model.
    other_base = build_tiny_model(
        tmp_path / "other-base", AutoTokenizer.from_pretrained(small_vocab_inputs["model"]), seed=1
    )
    message = refused(
        EVALUATE,
        "--model",
        other_base,
        "--data-dir",
        small_vocab_inputs["data"],
        "--checkpoints",
        lora_checkpoints,
        "--output-dir",
        tmp_path / "results",
        watch=[tmp_path, lora_checkpoints],
        runner=in_process,
    )
    assert f"the adapter in {lora_checkpoints / 'lora_r8'} was trained on another base model" in message


def test_a_finished_run_without_weights_is_refused_at_evaluation(
    in_process, lora_checkpoints, small_vocab_inputs, tmp_path
):
    checkpoints = shutil.copytree(lora_checkpoints, tmp_path / "checkpoints")
    (checkpoints / "lora_r8" / "adapter_model.safetensors").unlink()
    message = refused(
        EVALUATE,
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--checkpoints",
        checkpoints,
        "--output-dir",
        tmp_path / "results",
        watch=[tmp_path],
        runner=in_process,
    )
    assert "without its weights" in message


def test_missing_checkpoints_directory_is_refused_and_unfinished_runs_are_named(
    in_process, lora_checkpoints, small_vocab_inputs, tmp_path
):
    evaluate = [
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--output-dir",
        tmp_path / "results",
    ]
    message = refused(
        EVALUATE, *evaluate, "--checkpoints", tmp_path / "chekpoints", watch=[tmp_path], runner=in_process
    )
    assert f"--checkpoints {tmp_path / 'chekpoints'} is not a directory" in message

    (tmp_path / "empty").mkdir()
    result = in_process(EVALUATE, *evaluate, "--checkpoints", tmp_path / "empty", env=QUIET)
    assert (
        result.returncode == 0
        and "no finished runs in" in result.stdout
        and "only the base model is scored" in result.stdout
    )

    # A run stopped before its end: its config and log are there, its weights and run.json are not.
    checkpoints = shutil.copytree(lora_checkpoints, tmp_path / "checkpoints")
    stopped = checkpoints / "full_ft"
    stopped.mkdir()
    for name in ("train_config.json", "log.jsonl"):
        shutil.copy(checkpoints / "lora_r8" / name, stopped / name)
    result = in_process(EVALUATE, *evaluate, "--checkpoints", checkpoints, env=QUIET)
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: skipping {stopped}: it has no run.json, so its training did not finish" in result.stdout
        and "--resume" in result.stdout
    )
    rows = json.loads((tmp_path / "results" / "perplexity.json").read_text())
    assert [row["name"] for row in rows] == ["base", "lora_r8"]


def test_evaluation_takes_a_tokenizer_from_tokenizer_when_the_base_model_has_none(
    in_process, lora_checkpoints, small_vocab_inputs, tmp_path
):
    bare_model = tmp_path / "bare-model"  # weights and config only, as some exports are
    bare_model.mkdir()
    for path in small_vocab_inputs["model"].iterdir():
        if path.name == "config.json" or path.suffix == ".safetensors":
            shutil.copy(path, bare_model / path.name)
    args = [
        "--model",
        bare_model,
        "--data-dir",
        small_vocab_inputs["data"],
        "--checkpoints",
        lora_checkpoints,
        "--output-dir",
        tmp_path / "results",
    ]
    message = refused(EVALUATE, *args, watch=[tmp_path, lora_checkpoints], runner=in_process)
    # transformers finds some GPT-2 tokenizer for a bare GPT-2 config; the data's fingerprint tells it is not the
    # data's.
    assert "was tokenized with" in message and "pass the data's tokenizer with --tokenizer" in message
    result = in_process(EVALUATE, *args, "--tokenizer", small_vocab_inputs["model"], env=QUIET)
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads((tmp_path / "results" / "perplexity.json").read_text())] == [
        "base",
        "lora_r8",
    ]
