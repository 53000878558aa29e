"""Inputs nobody on the project wrote: every whole-number setting is range-checked where it is parsed (flags, study
files, --set), a tokenizer that lost its vocabulary is refused before anything is written, and the quick study's tiny
model carries its own tokenizer's special tokens."""

import json
import logging

import pytest
from conftest import FULL, PREPARE, QUICK, refused, run_script

from studykit.config import MAX_SEED, PrepareConfig, TrainConfig, parse_config
from studykit.errors import UserError
from studykit.study import parse_study_args
from studykit.study_config import EvalConfig
from studykit.study_file import load_study
from studykit.tiny import build_tiny_gpt2, tiny_gpt2_config, train_byte_level_tokenizer


@pytest.mark.parametrize(
    "config_class, flag, value, expected",
    [
        (TrainConfig, "--seed", "-1", f"--seed must be from 0 to {MAX_SEED} (got -1)"),
        (TrainConfig, "--seed", str(MAX_SEED + 1), f"--seed must be from 0 to {MAX_SEED} (got {MAX_SEED + 1})"),
        (TrainConfig, "--max-steps", "0", "--max-steps must be at least 1 (got 0)"),
        (TrainConfig, "--batch-size", "0", "--batch-size must be at least 1 (got 0)"),
        (TrainConfig, "--grad-accum", "-2", "--grad-accum must be at least 1 (got -2)"),
        (TrainConfig, "--eval-batch-size", "0", "--eval-batch-size must be at least 1 (got 0)"),
        (TrainConfig, "--save-every", "-1", "--save-every must be at least 0 (got -1)"),
        (TrainConfig, "--eval-every", "-5", "--eval-every must be at least 0 (got -5)"),
        (TrainConfig, "--log-every", "0", "--log-every must be at least 1 (got 0)"),
        (TrainConfig, "--keep", "0", "--keep must be at least 1 (got 0)"),
        (TrainConfig, "--pad-to-multiple-of", "0", "--pad-to-multiple-of must be at least 1 (got 0)"),
        (PrepareConfig, "--seq-len", "1", "--seq-len must be at least 2 (got 1)"),
        (EvalConfig, "--batch-size", "-1", "--batch-size must be at least 1 (got -1)"),
    ],
)
def test_a_flag_out_of_range_is_one_sentence(config_class, flag, value, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_config(config_class, "", [flag, value])


def test_a_config_file_out_of_range_is_refused_like_the_flag(tmp_path):
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps({"seed": -3}))
    with pytest.raises(UserError, match=r"--seed must be from 0 to .* \(got -3\)"):
        parse_config(TrainConfig, "", ["--config", str(path)])


def test_the_study_runner_refuses_a_negative_seed_before_its_dry_run():
    with pytest.raises(UserError, match=r"--seeds must be from 0 to .* \(got -1\)"):
        parse_study_args("", ["--preset", "quick", "--seeds", "0", "-1", "--dry-run"])
    with pytest.raises(UserError, match=r"--num-processes must be at least 1 \(got 0\)"):
        parse_study_args("", ["--num-processes", "0"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("budget.seeds=[0, -1]", "sets seeds = [0, -1]; write a list of different whole numbers from 0 to"),
        ("budget.sweep_seeds=[-1]", "sets sweep_seeds = [-1]; write a list of different whole numbers from 0 to"),
        ("budget.save_every=-1", "--save-every must be at least 0 (got -1)"),
        ("budget.eval_every=-1", "--eval-every must be at least 0 (got -1)"),
        ("budget.max_steps=0", "--max-steps must be at least 1 (got 0)"),
        ("budget.batch_size=0", "--batch-size must be at least 1 (got 0)"),
        ("budget.grad_accum=0", "--grad-accum must be at least 1 (got 0)"),
        ("runs.lora_r8.rank=0", "LoRA needs a positive rank and alpha (got rank=0"),
        ("tiny_model.seed=-1", "seed must be from 0 to"),
        ("tiny_model.pretrain_steps=-1", "pretrain_steps must be at least 0 (got -1)"),
        ("data.seq_len=0", "--seq-len must be at least 2 (got 0)"),
        ("eval.batch_size=0", "--batch-size must be at least 1 (got 0)"),
        ("report.bootstrap_seed=-1", "bootstrap_seed must be from 0 to"),
        ("report.sample_prompts=-1", "sample_prompts must be at least 0 (got -1)"),
    ],
)
def test_set_out_of_range_is_one_sentence_naming_it(override, expected):
    with pytest.raises(UserError) as raised:
        load_study(QUICK, overrides=[override])
    message = str(raised.value)
    assert expected in message and f"with --set {override}" in message, message


def test_a_study_file_out_of_range_is_refused(tmp_path):
    text = QUICK.read_text().replace("seeds = [0, 1]", "seed = -7")
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"sets seed = -7; write a whole number from 0 to"):
        load_study(path)
    path.write_text(QUICK.read_text().replace("max_steps = 30", "max_steps = 30\nsave_every = -2"))
    with pytest.raises(UserError, match=r"in .*study\.toml: --save-every must be at least 0 \(got -2\)"):
        load_study(path)


def test_a_tokenizer_without_its_vocabulary_is_refused_before_anything_is_written(tmp_path, oasst_trees_file):
    """transformers 5 loads a directory holding only config.json and tokenizer_config.json as a one-token tokenizer;
    prepare wrote a dataset of one token per response from it."""
    complete = tmp_path / "complete"
    train_byte_level_tokenizer(["Some text to learn a vocabulary from."] * 20, 300).save_pretrained(complete)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text((complete / "tokenizer_config.json").read_text())
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = tmp_path / "processed"
    message = refused(
        PREPARE, "--data-file", oasst_trees_file, "--tokenizer", broken, "--output-dir", out, watch=[tmp_path]
    )
    assert message.startswith(f"error: the tokenizer '{broken}' has 1 token(s)")
    assert "it holds none of tokenizer.json, vocab.json, merges.txt" in message and "pass --tokenizer" in message
    assert not out.exists()


def test_data_of_about_one_token_per_response_is_refused(tmp_path, oasst_trees_file, monkeypatch):
    """Whatever the tokenizer reports about itself, data it makes of one token per response is not written."""
    from studykit import modeling, prepare

    tokenizer_dir = tmp_path / "tokenizer"
    train_byte_level_tokenizer(["Some text to learn a vocabulary from."] * 20, 300).save_pretrained(tokenizer_dir)
    loaded = modeling.load_tokenizer(str(tokenizer_dir))
    original_call = type(loaded).__call__

    def one_token_each(self, texts, **kwargs):
        encoded = original_call(self, texts, **kwargs)
        if isinstance(texts, list):
            encoded["input_ids"] = [ids[:1] for ids in encoded["input_ids"]]
        return encoded

    monkeypatch.setattr(type(loaded), "__call__", one_token_each)
    monkeypatch.setattr(prepare, "load_tokenizer", lambda name, flag: loaded)
    out = tmp_path / "processed"
    config = PrepareConfig(
        data_file=str(oasst_trees_file),
        tokenizer=str(tokenizer_dir),
        output_dir=str(out),
        seq_len=64,
        test_fraction=0.2,
    )
    with pytest.raises(UserError, match=r"turns the .* train responses into .* tokens besides EOS \(about one each\)"):
        prepare.prepare(config)
    assert not out.exists()


def test_long_responses_are_cut_without_the_tokenizers_length_warning(tmp_path, gpt2_tokenizer, caplog):
    from studykit.data import tokenize_prompted_responses, tokenize_responses

    long_text = "word " * 2000  # beyond GPT-2's 1,024-token context
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers").addHandler(caplog.handler)
        try:
            ids, truncated = tokenize_responses([long_text, "short"], gpt2_tokenizer, 64)
            prompted = tokenize_prompted_responses(
                [long_text, "a question"], ["an answer", "short"], gpt2_tokenizer, 64
            )
        finally:
            logging.getLogger("transformers").removeHandler(caplog.handler)
    assert not [record for record in caplog.records if "sequence length" in record.getMessage()]
    full = gpt2_tokenizer(long_text, add_special_tokens=False, verbose=False)["input_ids"]
    assert ids[0] == full[:64] and truncated == 1 and ids[1][-1] == gpt2_tokenizer.eos_token_id
    prompt = gpt2_tokenizer(long_text.strip() + "\n\n", add_special_tokens=False, verbose=False)["input_ids"]
    kept = prompted.prompt_lengths[0]
    assert prompted.input_ids[0][:kept] == prompt[-kept:] and len(prompted.input_ids[0]) == 64


def test_the_tiny_models_config_has_its_own_tokenizers_special_tokens(tmp_path):
    """transformers validates a config's special tokens against its vocabulary; GPT2Config's defaults (50256) lie
    outside the tiny model's 512 tokens."""
    from transformers import AutoConfig, GenerationConfig

    from studykit.study import base_model_config

    tokenizer = train_byte_level_tokenizer(["Some text to learn a vocabulary from."] * 20, 300)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    level = transformers_logger.level
    transformers_logger.setLevel(logging.WARNING)
    try:
        configs = [
            tiny_gpt2_config(512, 2, 64, 2, 256),
            base_model_config(load_study(QUICK), exact_shape=True),
            base_model_config(load_study(QUICK)),
        ]
        model_dir = build_tiny_gpt2(tmp_path / "model", tokenizer, n_layer=1, n_embd=16)
        configs.append(AutoConfig.from_pretrained(model_dir))
        generation = GenerationConfig.from_pretrained(model_dir)
    finally:
        transformers_logger.removeHandler(handler)
        transformers_logger.setLevel(level)
    assert not [record.getMessage() for record in records if record.levelno >= logging.WARNING]
    for config in configs:
        config.validate()
        assert 0 <= config.bos_token_id < config.vocab_size and 0 <= config.eos_token_id < config.vocab_size
    assert configs[-1].eos_token_id == generation.eos_token_id == tokenizer.eos_token_id


def test_prepare_refuses_a_one_token_tokenizer_also_as_a_command_line_user_sees_it(tmp_path, oasst_trees_file):
    broken = tmp_path / "only-config"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    result = run_script(
        PREPARE, "--data-file", oasst_trees_file, "--tokenizer", broken, "--output-dir", tmp_path / "out", check=False
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_belong_to_the_model_is_one_sentence(
    tmp_path, small_vocab_inputs, gpt2_tokenizer_dir, processed_dir
):
    """The data and tokenizer agree (GPT-2's 50,257 tokens), the model has 300 embedding rows: ids past them would
    fail inside the forward pass."""
    message = refused(
        FULL,
        "--model",
        small_vocab_inputs["model"],
        "--tokenizer",
        gpt2_tokenizer_dir,
        "--data-dir",
        processed_dir,
        "--output-dir",
        tmp_path / "run",
        "--max-steps",
        "1",
        watch=[tmp_path],
    )
    assert "has 50,257 tokens, more than the 300 the model" in message and "pass the model's own tokenizer" in message


def test_a_vocabulary_far_smaller_than_the_models_is_refused(small_vocab_inputs, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from studykit.modeling import check_model_fits_tokenizer, load_tokenizer

    small = load_tokenizer(str(small_vocab_inputs["model"]))
    gpt2_sized = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match=r"has 300 tokens, far fewer than the model 'm''s 50,257"):
        check_model_fits_tokenizer(gpt2_sized, small, "m", "t")
    check_model_fits_tokenizer(gpt2_sized, load_tokenizer(str(tiny_model_dir)), "m", "t")


def test_samples_longer_than_the_models_context_are_refused_before_training():
    from studykit.study import check_runs_against_the_base_model

    check_runs_against_the_base_model(load_study(QUICK))
    with pytest.raises(UserError, match=r"sample_new_tokens = 256, which leaves no room .* 256-token context"):
        check_runs_against_the_base_model(load_study(QUICK, overrides=["report.sample_new_tokens=256"]))
