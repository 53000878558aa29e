"""--context parent: each response after the prompter message it answers, whose tokens condition the response but are
never targets; training loss, dev loss and perplexity count the response's tokens (and EOS) only. --context none
keeps the data, the fingerprints and the scores of responses alone."""

import contextlib
import io
import json
import math

import pytest
import torch
from conftest import ANSWERS, QUICK, build_tiny_model, oasst_message, train_in_process

from studykit.config import PrepareConfig
from studykit.data import (
    CONTEXT_SEPARATOR,
    IGNORE_INDEX,
    collate,
    combine_fingerprints,
    load_processed,
    plan_step_windows,
    predicted_tokens,
    sequences_fingerprint,
    tokenize_prompted_responses,
)
from studykit.errors import UserError
from studykit.evaluate import evaluate
from studykit.loss import batch_nll
from studykit.metrics import score_sequences
from studykit.modeling import load_base_model, load_tokenizer
from studykit.prepare import describe_changes, prepare, prepare_inputs
from studykit.samples import format_samples_markdown
from studykit.study_config import EvalConfig
from studykit.study_file import load_study

TREES = 10


def write_conversations(path):
    """Flat messages with known parents: per tree a question, two answers to it, a follow-up question to the first
    answer and an answer to that; besides, an answer whose parent is not in the export and one whose parent is an
    assistant message. Under --context parent the last two are dropped."""
    messages = []
    for t in range(TREES):
        tree = f"tree-{t:02d}"
        messages += [
            oasst_message(f"{tree}-q", tree, None, "prompter", f"  How do I do task number {t}?\n"),
            oasst_message(f"{tree}-a0", tree, f"{tree}-q", "assistant", ANSWERS[t % len(ANSWERS)]),
            oasst_message(f"{tree}-a1", tree, f"{tree}-q", "assistant", ANSWERS[(t + 1) % len(ANSWERS)] + " Also."),
            oasst_message(f"{tree}-f", tree, f"{tree}-a0", "prompter", f"And what about part {t} of it?"),
            oasst_message(f"{tree}-a2", tree, f"{tree}-f", "assistant", f"Part {t} works the same way."),
            oasst_message(f"{tree}-orphan", tree, "not-in-the-export", "assistant", "An answer to nothing we have."),
            oasst_message(f"{tree}-aa", tree, f"{tree}-a0", "assistant", "An answer to an answer."),
        ]
    with open(path, "w", encoding="utf-8") as stream:
        stream.writelines(json.dumps(message) + "\n" for message in messages)
    return {m["message_id"]: m for m in messages}


def prepare_quietly(**settings):
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare(PrepareConfig(**settings))


@pytest.fixture(scope="module")
def conversations(tmp_path_factory, gpt2_tokenizer_dir):
    root = tmp_path_factory.mktemp("context")
    by_id = write_conversations(root / "messages.jsonl")
    common = dict(
        data_file=str(root / "messages.jsonl"),
        tokenizer=str(gpt2_tokenizer_dir),
        seq_len=64,
        test_fraction=0.2,
        dev_fraction=0.2,
    )
    prepare_quietly(**common, output_dir=str(root / "parent"), context="parent")
    prepare_quietly(**common, output_dir=str(root / "none"))
    return {"by_id": by_id, "parent": root / "parent", "none": root / "none", "common": common}


def test_each_sequence_is_its_parent_then_the_separator_then_the_response(conversations, gpt2_tokenizer):
    data, by_id = load_processed(conversations["parent"]), conversations["by_id"]
    eos = gpt2_tokenizer.eos_token_id
    for split in (data.train, data.dev, data.test):
        assert not any(message_id.endswith(("-orphan", "-aa")) for message_id in split["message_id"])
        for row in split:
            response = by_id[row["message_id"]]
            parent = by_id[response["parent_id"]]
            prompt_text = parent["text"].strip() + CONTEXT_SEPARATOR
            prompt_ids = gpt2_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = gpt2_tokenizer(response["text"], add_special_tokens=False)["input_ids"] + [eos]
            assert row["prompt_length"] == len(prompt_ids) > 0
            assert row["input_ids"] == prompt_ids + response_ids
    meta = data.meta
    assert meta["context"] == "parent"
    for split in ("train", "dev", "test"):
        counts = meta["counts"][split]
        # Per tree five answers pass the filters; the orphan and the answer to an answer have no prompter parent.
        assert counts["language"] == 5 * counts["parent_prompt"] // 3
        assert meta["sequences"][split] == counts["parent_prompt"]
        assert meta["prompt_tokens"][split] == sum(getattr(data, split)["prompt_length"])


def test_context_is_an_input_of_the_data_and_its_fingerprints(conversations, gpt2_tokenizer):
    parent, none = load_processed(conversations["parent"]).meta, load_processed(conversations["none"]).meta
    assert parent["fingerprint"] != none["fingerprint"]
    assert parent["training_fingerprint"] != none["training_fingerprint"]
    assert parent["inputs"]["settings"]["context"] == "parent" and none["inputs"]["settings"]["context"] == "none"
    assert "--context (was none, now parent)" in describe_changes(none["inputs"], parent["inputs"])
    again = PrepareConfig(**conversations["common"], output_dir=str(conversations["parent"]), context="parent")
    assert prepare_inputs(again, gpt2_tokenizer) == parent["inputs"]


def test_context_none_keeps_the_data_and_fingerprints_of_responses_alone(conversations):
    data = load_processed(conversations["none"])
    fingerprints = {}
    for split in ("train", "dev", "test"):
        dataset = getattr(data, split)
        assert set(dataset["prompt_length"]) == {0}
        # The fingerprint as it was computed before prompts existed: ids and message ids alone.
        fingerprints[split] = sequences_fingerprint(dataset["input_ids"], dataset["message_id"])
        assert data.meta[f"{split}_fingerprint"] == fingerprints[split]
    seq_len = data.meta["seq_len"]
    train, dev, test = fingerprints["train"], fingerprints["dev"], fingerprints["test"]
    assert data.meta["fingerprint"] == combine_fingerprints(train, dev, test, seq_len)
    assert data.meta["training_fingerprint"] == combine_fingerprints(train, dev, seq_len)
    assert "parent_prompt" not in data.meta["counts"]["train"] and "prompt_tokens" not in data.meta
    sequences = [[5, 6, 7], [8, 9]]
    for key, value in collate(sequences, 0).items():
        assert torch.equal(value, collate(sequences, 0, prompt_lengths=[0, 0])[key])


def test_a_long_sequence_loses_the_start_of_its_prompt_and_keeps_its_response(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    prompt = " ".join(f"word{i}" for i in range(40))
    short, long = "A short answer.", " ".join(f"token{i}" for i in range(40))
    result = tokenize_prompted_responses([prompt, prompt], [short, long], gpt2_tokenizer, seq_len=24)
    prompt_ids = gpt2_tokenizer(prompt + CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"]
    short_ids = gpt2_tokenizer(short, add_special_tokens=False)["input_ids"] + [eos]
    long_ids = gpt2_tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 24 and len(long_ids) > 24
    # The short response whole, after the end of its prompt (the separator included), to seq_len exactly.
    kept = 24 - len(short_ids)
    assert result.input_ids[0] == prompt_ids[-kept:] + short_ids and result.prompt_lengths[0] == kept
    # The long response alone exceeds seq_len: cut as without prompts (losing EOS), and no prompt at all.
    assert result.input_ids[1] == long_ids[:24] and result.prompt_lengths[1] == 0
    assert result.truncated == 1 and result.prompts_shortened == 2


def hand_response_nll(model, sequences, prompt_lengths):
    """One unpadded sequence at a time, log-softmax by hand, summing only the predictions of response tokens: the
    first from the prompt's last token, none of a prompt token."""
    nll, tokens = [], []
    with torch.no_grad():
        for ids, prompt_length in zip(sequences, prompt_lengths):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            targets = range(max(1, prompt_length), len(ids))
            nll.append(-sum(float(log_probs[target - 1, ids[target]]) for target in targets))
            tokens.append(len(targets))
    return nll, tokens


@pytest.fixture(scope="module")
def prompted_batch(tiny_model_dir, gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    prompts = ["What is a list?", "How long should I boil an egg for a salad?", "Hi", "Tell me a story."]
    responses = [
        "A list holds items in order.",
        "Nine minutes.",
        "Hello! How can I help you today?",
        "Once upon a time.",
    ]
    result = tokenize_prompted_responses(prompts, responses, gpt2_tokenizer, seq_len=64)
    # A sequence without a prompt beside them: a response truncated to seq_len is kept so.
    sequences = result.input_ids + [gpt2_tokenizer("A response alone.", add_special_tokens=False)["input_ids"] + [eos]]
    prompt_lengths = result.prompt_lengths + [0]
    model = load_base_model(str(tiny_model_dir)).eval()
    return model, sequences, prompt_lengths


@pytest.mark.parametrize("batch_size", [1, 8])
def test_perplexity_counts_response_tokens_only(prompted_batch, gpt2_tokenizer, batch_size):
    model, sequences, prompt_lengths = prompted_batch
    expected_nll, expected_tokens = hand_response_nll(model, sequences, prompt_lengths)
    scores = score_sequences(
        model, sequences, batch_size, torch.device("cpu"), gpt2_tokenizer.eos_token_id, prompt_lengths=prompt_lengths
    )
    targets = [predicted_tokens(len(s), p) for s, p in zip(sequences, prompt_lengths)]
    assert scores.token_counts.tolist() == expected_tokens == targets
    assert expected_tokens[:4] == [len(s) - p for s, p in zip(sequences[:4], prompt_lengths[:4])]
    assert scores.nll_sums == pytest.approx(expected_nll, rel=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(sum(expected_nll) / sum(expected_tokens)), rel=1e-5)
    # The prompt conditions the response: scoring the same tokens as responses alone gives another NLL.
    unmasked = score_sequences(model, sequences, batch_size, torch.device("cpu"), gpt2_tokenizer.eos_token_id)
    assert unmasked.tokens == sum(len(s) - 1 for s in sequences) > scores.tokens


def test_training_loss_is_the_cross_entropy_of_response_tokens_only(prompted_batch):
    model, sequences, prompt_lengths = prompted_batch
    batch = collate(sequences, 50256, prompt_lengths=prompt_lengths)
    # By hand: full logits, every next-token prediction, and a mask that keeps the response tokens' only.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    positions = torch.arange(1, batch["input_ids"].size(1))
    lengths, prompts = torch.tensor([len(s) for s in sequences]), torch.tensor(prompt_lengths)
    response = (positions[None, :] >= prompts.clamp(min=1)[:, None]) & (positions[None, :] < lengths[:, None])
    with torch.no_grad():
        total = batch_nll(model, batch, contextlib.nullcontext).total
    assert float(total) == pytest.approx(float((nll * response).sum()), rel=1e-5)
    assert int(response.sum()) == sum(predicted_tokens(len(s), p) for s, p in zip(sequences, prompt_lengths))
    # The prompt's labels are masked, the first response token's is not (the prompt's last token predicts it).
    for row, prompt_length in enumerate(prompt_lengths):
        assert set(batch["labels"][row, :prompt_length].tolist()) <= {IGNORE_INDEX}
        assert batch["labels"][row, prompt_length] == sequences[row][prompt_length]


def test_the_separator_is_one_gpt2_token_and_leaves_the_response_tokens_alone(gpt2_tokenizer):
    assert len(gpt2_tokenizer(CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"]) == 1
    assert (
        gpt2_tokenizer("Question?" + CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"][-1]
        == gpt2_tokenizer(CONTEXT_SEPARATOR, add_special_tokens=False)["input_ids"][0]
    )


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory, small_vocab_inputs, oasst_trees_file):
    """The small-vocabulary model without dropout (so a step's loss can be recomputed by hand), data prepared with
    --context parent, one training step of full fine-tuning and evaluation of it."""
    root = tmp_path_factory.mktemp("prompted-run")
    tokenizer = load_tokenizer(str(small_vocab_inputs["model"]))
    model_dir = build_tiny_model(root / "model", tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    prepare_quietly(
        data_file=str(oasst_trees_file),
        tokenizer=str(model_dir),
        output_dir=str(root / "data"),
        seq_len=64,
        test_fraction=0.2,
        context="parent",
    )
    inputs = {"model": model_dir, "data": root / "data"}
    record = train_in_process("full", inputs, root / "checkpoints" / "full", max_steps=1, precision="fp32")
    with contextlib.redirect_stdout(io.StringIO()):
        rows = evaluate(
            EvalConfig(
                model=str(model_dir),
                data_dir=str(root / "data"),
                checkpoints=str(root / "checkpoints"),
                output_dir=str(root / "results"),
                precision="fp32",
            )
        )
    return {"inputs": inputs, "record": record, "rows": rows, "root": root}


def test_a_training_step_averages_over_response_tokens_only(prompted_run):
    data = load_processed(prompted_run["inputs"]["data"])
    record = prompted_run["record"]
    lengths, prompt_lengths = [len(ids) for ids in data.train["input_ids"]], data.train["prompt_length"]
    assert min(prompt_lengths) > 0
    window = plan_step_windows(lengths, record["effective_batch"], record["seed"], 0, True)[0]
    model = load_base_model(str(prompted_run["inputs"]["model"])).eval()
    sequences = [data.train["input_ids"][i] for i in window]
    nll, tokens = hand_response_nll(model, sequences, [prompt_lengths[i] for i in window])
    assert record["tokens_seen"] == sum(tokens) == sum(lengths[i] - prompt_lengths[i] for i in window)
    log_file = prompted_run["root"] / "checkpoints" / "full" / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert log[0]["train_loss"] == pytest.approx(sum(nll) / sum(tokens), rel=1e-5)


def test_evaluation_scores_and_counts_response_tokens_only(prompted_run):
    import numpy as np

    data = load_processed(prompted_run["inputs"]["data"])
    expected = [predicted_tokens(len(ids), p) for ids, p in zip(data.test["input_ids"], data.test["prompt_length"])]
    model = load_base_model(str(prompted_run["inputs"]["model"])).eval()
    nll, tokens = hand_response_nll(model, data.test["input_ids"], data.test["prompt_length"])
    base = next(row for row in prompted_run["rows"] if row["name"] == "base")
    assert base["tokens"] == sum(tokens) == sum(expected)
    assert base["nll_sum"] == pytest.approx(sum(nll), rel=1e-5)
    per_response = np.load(prompted_run["root"] / "results" / "per_response_nll.npz")
    assert per_response["base/tokens"].tolist() == per_response["full/tokens"].tolist() == expected


def test_packing_is_refused_for_data_with_prompts(prompted_run, tmp_path):
    with pytest.raises(UserError) as refusal:
        train_in_process("full", prompted_run["inputs"], tmp_path / "packed", packing=True)
    message = str(refusal.value)
    assert "--packing cannot train data prepared with --context parent" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert not (tmp_path / "packed").exists()


def test_a_study_that_packs_data_with_prompts_is_refused_when_read(tmp_path):
    text = QUICK.read_text().replace("seq_len = 128", 'seq_len = 128\ncontext = "parent"', 1)
    text = text.replace("log_every = 2", "log_every = 2\npacking = true", 1)
    (tmp_path / "study.toml").write_text(text)
    with pytest.raises(UserError, match=r"run '.*' in .* with \[data\] context = \"parent\": --packing cannot train"):
        load_study(tmp_path / "study.toml", output_dir=str(tmp_path / "out"))
    (tmp_path / "study.toml").write_text(text.replace("packing = true", "packing = false"))
    assert load_study(tmp_path / "study.toml", output_dir=str(tmp_path / "out")).prepare.context == "parent"


def test_samples_say_what_the_runs_were_trained_on():
    prompts = [{"message_tree_id": "t", "text": "Hi?"}]
    assert "never on a prompt followed by its answer" in format_samples_markdown(prompts, {"base": ["x"]}, 4)
    assert "after the prompt it answers" in format_samples_markdown(prompts, {"base": ["x"]}, 4, "parent")
