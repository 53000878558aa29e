"""The processed dataset on disk, and how batches are formed from it."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from studykit.errors import UserError, first_line
from studykit.io import DamagedFile, find_partial_directories, read_json

# Labels with this value are ignored by the loss: padding only, never EOS.
IGNORE_INDEX = -100
META_FILE = "meta.json"
# train: what training steps on; dev: what training scores and every choice reads; test: scored by evaluation only.
SPLITS = ("train", "dev", "test")


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary, so data tokenized by one tokenizer is never fed to a model with another."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocabulary, tokenizer.eos_token_id], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def tokenize_responses(texts: Sequence[str], tokenizer, seq_len: int) -> tuple[list[list[int]], int]:
    """EOS ends every response so the model learns to stop; a response longer than seq_len is cut (and loses EOS)."""
    # Cut by the tokenizer at seq_len (a response that long loses its EOS below anyway): the same tokens as cutting
    # afterwards, and no text longer than the model's context goes through uncut (transformers warns of that).
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
    sequences, truncated = [], 0
    for ids in encoded:
        ids = list(ids) + [tokenizer.eos_token_id]
        if len(ids) > seq_len:
            ids = ids[:seq_len]
            truncated += 1
        sequences.append(ids)
    return sequences, truncated


# Between a prompt and its response (--context parent): a blank line, the break OASST texts themselves put between
# paragraphs. The sequence stays plain text of the kind GPT-2 was pretrained on, with no role marker it never saw and
# no new token; GPT-2 encodes it as one token. samples.py ends its prompts with it too.
CONTEXT_SEPARATOR = "\n\n"


@dataclass
class PromptedSequences:
    """Responses tokenized after their prompts: each sequence's first prompt_lengths[i] tokens are prompt."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]
    truncated: int  # responses longer than seq_len alone: cut as without prompts, and kept with no prompt
    prompts_shortened: int  # prompts that lost tokens from their start (all of them, for a truncated response)


def tokenize_prompted_responses(
    prompts: Sequence[str], texts: Sequence[str], tokenizer, seq_len: int
) -> PromptedSequences:
    """Each prompt, then CONTEXT_SEPARATOR, then its response and EOS. Prompt and response are tokenized apart, so a
    response's tokens, the targets, are exactly those it has under --context none and the perplexities of the two
    settings score the same tokens. A sequence over seq_len keeps its response: the prompt loses its start, and its
    end, nearest the response, stays."""
    responses, truncated = tokenize_responses(texts, tokenizer, seq_len)
    prompt_texts = [prompt.strip() + CONTEXT_SEPARATOR for prompt in prompts]
    # A prompt keeps its end: cut from the left at seq_len, more than any prompt keeps below.
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        encoded = tokenizer(prompt_texts, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
    finally:
        tokenizer.truncation_side = side
    sequences, prompt_lengths, shortened = [], [], 0
    for prompt_ids, response_ids in zip(encoded, responses):
        room = seq_len - len(response_ids)
        kept = list(prompt_ids)[max(0, len(prompt_ids) - room) :]
        shortened += len(kept) < len(prompt_ids)
        sequences.append(kept + response_ids)
        prompt_lengths.append(len(kept))
    return PromptedSequences(sequences, prompt_lengths, truncated, shortened)


def predicted_tokens(length: int, prompt_length: int) -> int:
    """The targets of one sequence: every token after its prompt; without a prompt every token but the first, which
    nothing before it predicts."""
    return length - max(1, prompt_length)


def split_prompt_lengths(dataset) -> list[int]:
    """A split's prompt_length column; zeros for data prepared before the column existed (responses alone)."""
    if "prompt_length" in dataset.column_names:
        return list(dataset["prompt_length"])
    return [0] * len(dataset)


def sequences_fingerprint(
    input_ids: Sequence[Sequence[int]], message_ids: Sequence[str], prompt_lengths: Optional[Sequence[int]] = None
) -> str:
    """Identifies a split's sequences and which of their tokens are prompt. A sequence without a prompt adds nothing
    for it, so data without prompts keeps the fingerprint it had before prompts existed."""
    digest = hashlib.sha256()
    for index, (ids, message_id) in enumerate(zip(input_ids, message_ids)):
        digest.update(str(message_id).encode("utf-8"))
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        if prompt_lengths is not None and prompt_lengths[index]:
            digest.update(f"prompt:{prompt_lengths[index]}".encode("utf-8"))
    return digest.hexdigest()[:16]


def combine_fingerprints(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).hexdigest()[:16]


@dataclass
class ProcessedData:
    """The tokenized splits plus the metadata that records how they were made."""

    path: Path
    train: Any
    dev: Any
    test: Any
    meta: dict[str, Any]


def load_processed(data_dir: str | Path) -> ProcessedData:
    import datasets

    path = Path(data_dir)
    partial = find_partial_directories(path.parent) if path.parent.exists() else []
    partial = [p for p in partial if p.name.startswith(path.name)]
    if not (path / META_FILE).exists():
        hint = f" (found an unfinished write at {partial[0]}, left by a crash; delete it)" if partial else ""
        raise UserError(
            f"no processed dataset in {path}{hint}; run `python data/prepare_oasst.py --output-dir {path}` first "
            "or pass --data-dir."
        )
    remedy = (
        f"prepare it again with `python data/prepare_oasst.py --output-dir {path} --overwrite` (and the data flags "
        "you used)"
    )
    meta = read_json(path / META_FILE, remedy)
    if "dev" not in meta.get("sequences", {}):
        raise UserError(
            f"the processed dataset in {path} has no dev split (it was prepared by an earlier version of the kit, "
            f"which held out a validation split only); {remedy}."
        )
    try:
        dataset_dict = datasets.load_from_disk(str(path))
        for split in SPLITS:
            if split not in dataset_dict or len(dataset_dict[split]) == 0:
                raise UserError(
                    f"the processed dataset in {path} has no {split} examples; run data/prepare_oasst.py on more data."
                )
            check_split_intact(path, split, dataset_dict[split], meta, remedy)
    except FileNotFoundError as error:
        raise UserError(f"the processed dataset in {path} is incomplete ({first_line(error)}); {remedy}.") from None
    except UserError:
        raise
    except Exception as error:  # pyarrow and datasets raise OSError, ValueError or their own types for a damaged file
        raise DamagedFile(path, first_line(error), remedy) from None
    return ProcessedData(path, dataset_dict["train"], dataset_dict["dev"], dataset_dict["test"], meta)


def check_split_intact(path: Path, split: str, dataset, meta: dict[str, Any], remedy: str) -> None:
    """Reads every sequence of the split, so a file cut short fails here rather than mid-run, and compares them with
    the fingerprint prepare recorded, which catches changed bytes that Arrow would read without complaint."""
    recorded = meta.get(f"{split}_fingerprint")
    fingerprint = sequences_fingerprint(dataset["input_ids"], dataset["message_id"], split_prompt_lengths(dataset))
    if recorded and fingerprint != recorded:
        raise DamagedFile(path / split, f"its {split} sequences no longer match the fingerprint in {META_FILE}", remedy)


def check_tokenizer_matches(data: ProcessedData, tokenizer, tokenizer_name: str) -> None:
    recorded = data.meta.get("tokenizer_fingerprint")
    if recorded and recorded != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{data.path} was tokenized with '{data.meta.get('tokenizer')}', which differs from the tokenizer of "
            f"'{tokenizer_name}'; pass the data's tokenizer with --tokenizer, or prepare the data again with "
            f"--tokenizer {tokenizer_name}."
        )


def pack_sequences(sequences: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate responses (each ending in EOS) and cut full blocks; the ragged tail is dropped."""
    stream = [token for ids in sequences for token in ids]
    return [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]


def collate(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to: Optional[int] = None,
    prompt_lengths: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch (or `pad_to`). Labels are masked by position, not by token id,
    because GPT-2 pads with its EOS id and EOS must stay a target. A sequence's first prompt_lengths[row] tokens are
    prompt: attended to, never targets; the first response token, predicted from the prompt's last, is one."""
    width = pad_to or max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for row, prompt_length in enumerate(prompt_lengths or ()):
        labels[row, :prompt_length] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def plan_step_windows(
    lengths: Sequence[int], examples_per_step: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The examples of each optimizer step, in order, for one epoch.

    A window depends only on the seed, the epoch and the effective batch, never on how it is later cut into
    micro-batches or processes; so gradient accumulation, auto-batch and DDP all see the same steps.
    With length grouping, windows are cut from length-sorted chunks so that their micro-batches need little
    padding, and the windows are then shuffled.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if group_by_length:
        chunk = examples_per_step * 64
        order = [
            index
            for start in range(0, len(order), chunk)
            for index in sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        ]
    windows = [
        order[start : start + examples_per_step]
        for start in range(0, len(order) - examples_per_step + 1, examples_per_step)
    ]
    if group_by_length:
        rng.shuffle(windows)
    return windows


def split_window(window: Sequence[int], lengths: Sequence[int], micro_batches: int) -> list[list[int]]:
    """Cut one step's examples into micro-batches of similar length (longest first)."""
    ordered = sorted(window, key=lambda i: lengths[i], reverse=True)
    size = len(ordered) // micro_batches
    return [ordered[k * size : (k + 1) * size] for k in range(micro_batches)]


# A batch of short responses holds at most this many times --batch-size of them: besides its tokens, each row costs
# the model's last-position logits (a vocabulary of floats), which the token budget does not see.
SHORT_BATCH_GROWTH = 8


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of similar length, longest first; the sums do not depend on how they are cut.

    The first batch holds `batch_size` of the longest sequences. Each later one holds as many shorter ones as fit in
    the same number of padded positions (up to SHORT_BATCH_GROWTH x batch_size), so memory peaks at the first batch
    and the short responses most of OASST is made of do not leave a GPU idle in batches of a few hundred tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if not order:
        return []
    padded_positions = batch_size * max(1, lengths[order[0]])
    batches, start = [], 0
    while start < len(order):
        rows = min(max(1, padded_positions // max(1, lengths[order[start]])), SHORT_BATCH_GROWTH * batch_size)
        batches.append(order[start : start + rows])
        start += rows
    return batches
