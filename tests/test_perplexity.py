"""Perplexity = exp(total NLL / total predicted tokens), checked against a hand-written reference."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from studykit import loss
from studykit.data import IGNORE_INDEX, collate
from studykit.metrics import score_sequences


def reference_perplexity(model, sequences):
    """One unpadded sequence at a time, log-softmax by hand, every next token counted once."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            input_ids = torch.tensor([ids])
            log_probs = torch.log_softmax(model(input_ids=input_ids).logits[0].double(), dim=-1)
            for position in range(len(ids) - 1):
                total_nll -= float(log_probs[position, ids[position + 1]])
                total_tokens += 1
    return math.exp(total_nll / total_tokens), total_nll, total_tokens


@pytest.fixture(scope="module")
def model_and_sequences(tiny_model_dir, gpt2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eos = gpt2_tokenizer.eos_token_id
    texts = [
        "Hi.",
        "A somewhat longer answer with several more tokens in it.",
        "Mid length reply here.",
        "One",
        "The longest response of them all, which keeps going for quite a few tokens, more than the others.",
        "Short again.",
    ]
    sequences = [gpt2_tokenizer(text)["input_ids"] + [eos] for text in texts]
    assert len({len(s) for s in sequences}) == len(sequences), "lengths must be uneven so padding is exercised"
    return model, sequences


@pytest.mark.parametrize("batch_size", [1, 4])
def test_perplexity_matches_hand_computed_reference(model_and_sequences, gpt2_tokenizer, batch_size):
    model, sequences = model_and_sequences
    expected_ppl, expected_nll, expected_tokens = reference_perplexity(model, sequences)
    scores = score_sequences(model, sequences, batch_size, torch.device("cpu"), gpt2_tokenizer.eos_token_id)
    assert scores.tokens == expected_tokens == sum(len(s) - 1 for s in sequences)
    assert scores.nll_sum == pytest.approx(expected_nll, rel=1e-5)
    assert scores.perplexity == pytest.approx(expected_ppl, rel=1e-5)


def test_chunks_of_the_output_layer_that_split_responses_change_nothing(
    model_and_sequences, gpt2_tokenizer, monkeypatch
):
    model, sequences = model_and_sequences
    whole = score_sequences(model, sequences, 4, torch.device("cpu"), gpt2_tokenizer.eos_token_id)
    # 3 positions a chunk: every response's targets are spread over several chunks, most chunks hold two responses.
    monkeypatch.setitem(loss.LOGIT_CHUNK_BYTES, "cpu", 3 * 4 * model.config.vocab_size)
    assert loss.logit_chunk_positions(model.config.vocab_size, "cpu") == 3
    chunked = score_sequences(model, sequences, 4, torch.device("cpu"), gpt2_tokenizer.eos_token_id)
    assert chunked.token_counts.tolist() == whole.token_counts.tolist()
    assert chunked.nll_sums == pytest.approx(whole.nll_sums, rel=1e-6)


def test_perplexity_is_token_weighted_not_a_mean_of_means(model_and_sequences, gpt2_tokenizer):
    model, sequences = model_and_sequences
    scores = score_sequences(model, sequences, 4, torch.device("cpu"), gpt2_tokenizer.eos_token_id)
    mean_of_means = math.exp(float((scores.nll_sums / scores.token_counts).mean()))
    assert scores.perplexity != pytest.approx(mean_of_means, rel=1e-3)


def test_padding_is_ignored_and_eos_is_a_target(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    batch = collate([[5, 6, eos], [7, eos, 8, 9, eos]], pad_token_id=eos)
    # GPT-2 pads with its EOS id; masking by id would drop the real EOS targets too.
    assert batch["labels"].tolist() == [[5, 6, eos, IGNORE_INDEX, IGNORE_INDEX], [7, eos, 8, 9, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
