"""The quick preset's base model: a tiny GPT-2 pre-trained briefly on the shipped general text. Built once per module
with 40 steps of 64-token blocks (about 2 s of building; the quick preset uses 400 steps of 128)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import REPO_ROOT

from studykit import tiny
from studykit.errors import UserError

SAMPLE = REPO_ROOT / "data" / "sample"
OASST = SAMPLE / "oasst_sample.jsonl"
GENERAL, HELDOUT = SAMPLE / "general_text.txt", SAMPLE / "general_text_heldout.txt"
SETTINGS = dict(vocab_size=512, n_layer=2, n_embd=64, pretrain_steps=40, block_size=64, lr=3e-3, seed=0, batch_size=8)
# 40 steps take held-out perplexity from ~522 to ~183 (x2.9); the quick preset's 400 steps of 128 tokens reach ~48.
PERPLEXITY_FACTOR = 2.0


def build(directory, **overrides):
    settings = {"heldout_text_file": HELDOUT, **SETTINGS, **overrides}
    return tiny.build_pretrained_tiny_gpt2(directory, OASST, GENERAL, **settings)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small gain little from a second thread and lose much when other jobs share the cores: on a shared
    2-core machine this module took 16 s with one thread and 57 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_thread):
    directory = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    return directory, build(directory)


def weights(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def test_the_model_and_tokenizer_load_with_transformers(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = pretrained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert model.config.vocab_size == len(tokenizer) == 512
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (model.config.n_layer, model.config.n_embd) == (2, 64)
    assert model.config.resid_pdrop == 0.1, "pre-training turns dropout off but saves GPT-2's rate for fine-tuning"
    assert json.loads((directory / tiny.NOTE_FILE).read_text())["pretrain_steps"] == 40


def test_the_same_seed_gives_the_same_weights_and_the_heldout_text_does_not_change_them(pretrained, tmp_path):
    directory, _ = pretrained
    build(tmp_path / "again", heldout_text_file=None)
    first, second = weights(directory), weights(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_pretraining_lowers_the_heldout_perplexity_clearly(pretrained):
    _, note = pretrained
    assert note.heldout_perplexity_before > 400, "a random model is about as unsure as the vocabulary is large"
    assert note.heldout_perplexity_after < note.heldout_perplexity_before / PERPLEXITY_FACTOR
    assert note.final_training_loss < 5.5


def test_the_note_records_the_texts_and_the_settings(pretrained):
    directory, note = pretrained
    recorded = json.loads((directory / tiny.NOTE_FILE).read_text())
    assert recorded["general_text"] == "general_text.txt"
    assert recorded["general_text_sha256"] == hashlib.sha256(GENERAL.read_bytes()).hexdigest()
    assert recorded["heldout_text_sha256"] == hashlib.sha256(HELDOUT.read_bytes()).hexdigest()
    assert recorded["oasst_file_sha256"] == hashlib.sha256(OASST.read_bytes()).hexdigest()
    assert {key: recorded[key] for key in SETTINGS} == SETTINGS
    assert recorded["training_blocks"] > 500 and recorded["lr_schedule"] == tiny.LR_SCHEDULE
    assert recorded["heldout_perplexity_after"] == note.heldout_perplexity_after and recorded["pretrain_seconds"] > 0


def test_the_tokenizer_covers_both_texts(pretrained):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained[0])
    general, oasst = tiny.read_paragraphs(GENERAL), tiny.sample_texts(OASST)
    for text in (general[0], general[-1], oasst[0], "Grüße, naïve café ☕"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # Trained on the OASST sample alone, the tokenizer gets 1.9 characters per token on the general text; on both,
    # 2.2 (and 2.5 on the OASST texts): its merges come from both.
    for texts in (general, oasst):
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        assert sum(map(len, texts)) / sum(map(len, ids)) > 2.0


def test_the_heldout_paragraphs_are_not_in_the_training_text():
    training_text, heldout = GENERAL.read_text(encoding="utf-8"), tiny.read_paragraphs(HELDOUT)
    assert len(heldout) >= 30 and len(training_text) > 7 * len(HELDOUT.read_text(encoding="utf-8"))
    assert not [paragraph for paragraph in heldout if paragraph in training_text]


def test_no_pretraining_steps_gives_the_random_model(tmp_path):
    note = build(tmp_path / "random", pretrain_steps=0)
    tokenizer = tiny.train_byte_level_tokenizer(tiny.sample_texts(OASST) + tiny.read_paragraphs(GENERAL), 512)
    random_model = tiny.tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=2, n_positions=256, seed=0).state_dict()
    built = weights(tmp_path / "random")
    assert all(torch.equal(built[name], random_model[name]) for name in built)
    assert note.final_training_loss is None and note.heldout_perplexity_after == note.heldout_perplexity_before


def test_the_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [tiny.learning_rate(step, 100, 1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0) == max(rates)
    assert rates[-1] == pytest.approx(0.1, abs=0.01) and rates[10:] == sorted(rates[10:], reverse=True)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"block_size": 512}, "n_positions"),
        ({"pretrain_steps": -1}, "at least 0"),
        ({"n_embd": 66, "n_head": 4}, "multiple of n_head"),
    ],
)
def test_impossible_settings_are_refused_in_one_sentence(tmp_path, overrides, words):
    with pytest.raises(UserError, match=words):
        build(tmp_path / "refused", **overrides)
    assert not (tmp_path / "refused").exists()


def test_a_missing_text_file_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tiny.build_pretrained_tiny_gpt2(tmp_path / "model", OASST, tmp_path / "absent.txt", **SETTINGS)
