"""Stage 1: OASST1 -> filtered, tokenized, unpadded sequences on disk, with a meta.json that says how."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Optional

from studykit import locks
from studykit.config import PrepareConfig, config_to_dict, print_config, save_config
from studykit.data import (
    META_FILE,
    SPLITS,
    PromptedSequences,
    combine_fingerprints,
    sequences_fingerprint,
    tokenize_prompted_responses,
    tokenize_responses,
    tokenizer_fingerprint,
)
from studykit.errors import UserError
from studykit.io import (
    DamagedFile,
    atomic_directory,
    atomic_write_json,
    check_writable_location,
    disk_space_for,
    read_json,
    refuse_foreign_directory,
)
from studykit.modeling import check_tokenizer_vocabulary, load_tokenizer
from studykit.oasst import (
    FILTER_STAGES,
    PARENT_STAGE,
    OasstSource,
    filter_messages,
    load_source,
    opening_prompts,
    parse_languages,
    with_parent_prompts,
)
from studykit.runtime import stage_code_version

# A tokenizer's model_max_length above this is a placeholder, not a real context length.
UNSET_CONTEXT = 1_000_000
# Opening prompts of test trees, kept as text (the processed data holds only tokenized responses), for the samples.
PROMPTS_FILE = "prompts.json"
PROMPTS_KEPT = 16
# OASST responses run to hundreds of tokens; a tokenizer that makes one of each has no vocabulary to speak of.
MIN_TOKENS_PER_RESPONSE = 1
# Written beside meta.json; the two together mark a directory as a dataset this stage made.
PREPARE_CONFIG_FILE = "prepare_config.json"


# Settings that do not change what is written.
NOT_INPUTS = ("output_dir", "overwrite")
# Bytes the dataset takes per token (int64 ids in Arrow) and per response (offsets, message and tree ids).
DATASET_BYTES_PER_TOKEN = 8
DATASET_BYTES_PER_RESPONSE = 120


def check_dataset_directory(output_dir: Path) -> bool:
    """Creates nothing; returns whether the directory holds a prepared dataset. The new dataset replaces the whole
    directory in one rename, so a directory holding anything but an earlier prepared dataset (a model, someone's
    files) is refused rather than deleted."""
    check_writable_location(output_dir, "--output-dir")
    # The rename that puts the dataset in place happens in the parent.
    check_writable_location(output_dir.parent, "--output-dir")
    holds_dataset = (output_dir / META_FILE).is_file() and (output_dir / PREPARE_CONFIG_FILE).is_file()
    refuse_foreign_directory(output_dir, holds_dataset, "prepared dataset")
    return holds_dataset


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def prepare_inputs(config: PrepareConfig, tokenizer) -> dict[str, Any]:
    """Everything the dataset is made from: the settings, the data itself (a local file by its contents, wherever it
    lies), the tokenizer's vocabulary and the code. The same inputs make the same dataset."""
    settings = {key: value for key, value in config_to_dict(config).items() if key not in NOT_INPUTS}
    source: dict[str, Any] = {"dataset": config.dataset}
    if config.data_file:
        settings.pop("data_file")
        source = (
            {"data_file_sha256": file_digest(Path(config.data_file))}
            if Path(config.data_file).is_file()
            else {"data_file": config.data_file}
        )
    return {
        "settings": settings,
        "source": source,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "code": stage_code_version("studykit.prepare"),
    }


INPUT_NAMES = {
    "source": "the data",
    "tokenizer_fingerprint": "the tokenizer's vocabulary",
    "code": "the kit's prepare code",
}


def existing_inputs(output_dir: Path) -> Optional[dict[str, Any]]:
    """The inputs recorded by the dataset already in `output_dir`; None when it recorded none or cannot be read."""
    try:
        return read_json(output_dir / META_FILE, "prepare it again with --overwrite").get("inputs")
    except DamagedFile:
        return None


def describe_changes(old: Optional[dict[str, Any]], new: dict[str, Any]) -> str:
    if old is None:
        return "it records no inputs (an earlier version of the kit made it, or its meta.json is damaged)"
    changed = [
        f"--{key.replace('_', '-')} (was {old.get('settings', {}).get(key)}, now {value})"
        for key, value in new["settings"].items()
        if old.get("settings", {}).get(key) != value
    ]
    changed += [INPUT_NAMES[key] for key in INPUT_NAMES if old.get(key) != new[key]]
    return "it was made from other inputs: " + ", ".join(changed[:4])


def check_seq_len(seq_len: int, tokenizer, tokenizer_name: str) -> None:
    context = getattr(tokenizer, "model_max_length", None)
    if context and context < UNSET_CONTEXT and seq_len > context:
        raise UserError(
            f"--seq-len {seq_len} exceeds the context of '{tokenizer_name}' ({context} tokens); pass --seq-len "
            f"{context} or less."
        )


def check_tokens_per_response(
    input_ids: list[list[int]], prompt_lengths: list[int], tokenizer_name: str, split: str
) -> None:
    """A tokenizer that makes about one token of a response (its EOS aside) has lost its vocabulary, whatever it
    reports: a study on such data would train and report garbage. Judged before anything is written."""
    response_tokens = sum(len(ids) - prompt for ids, prompt in zip(input_ids, prompt_lengths)) - len(input_ids)
    if response_tokens <= MIN_TOKENS_PER_RESPONSE * len(input_ids):
        raise UserError(
            f"the tokenizer '{tokenizer_name}' turns the {len(input_ids):,} {split} responses into {response_tokens:,} "
            "tokens besides EOS (about one each); its vocabulary is missing or wrong: pass --tokenizer a complete "
            "tokenizer directory (with tokenizer.json, or vocab.json and merges.txt) or a hub id such as gpt2."
        )


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Prepare the dataset, or keep the one in --output-dir when it was made from the same inputs."""
    print_config(config)
    output_dir = Path(config.output_dir)
    holds_dataset = check_dataset_directory(output_dir)
    with locks.exclusive(output_dir, "--output-dir"):
        tokenizer = load_tokenizer(config.tokenizer, "--tokenizer")
        check_tokenizer_vocabulary(tokenizer, config.tokenizer)
        check_seq_len(config.seq_len, tokenizer, config.tokenizer)
        inputs = prepare_inputs(config, tokenizer)
        recorded = existing_inputs(output_dir) if holds_dataset else None
        if holds_dataset and recorded == inputs:
            meta = read_json(output_dir / META_FILE)
            print(
                f"up to date: {output_dir} was prepared from the same inputs (fingerprint {meta['fingerprint']}); "
                "nothing rewritten"
            )
            return meta
        started = time.perf_counter()
        source = load_source(
            config.data_file, config.dataset, config.test_fraction, config.dev_fraction, config.skip_bad_lines
        )
        splits, meta = build_dataset(config, tokenizer, source)
        # Judged once the data has been read and tokenized: a mistake in the data is the one to report first.
        if holds_dataset and not config.overwrite:
            raise UserError(
                f"{output_dir} holds a prepared dataset, but {describe_changes(recorded, inputs)}; pass --overwrite "
                "to replace it, or choose another --output-dir."
            )
        meta.update(inputs=inputs, seconds=round(time.perf_counter() - started, 3))
        save_dataset(config, source, splits, meta, output_dir)
    return meta


def tokenize_split(
    config: PrepareConfig,
    tokenizer,
    responses: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    counts: dict[str, int],
) -> tuple[list[dict[str, Any]], PromptedSequences]:
    """The responses that make sequences and their tokens; under --context parent each after its parent's text (a
    response without a prompter parent is dropped, and counts[PARENT_STAGE] says how many are left)."""
    if config.context == "none":
        input_ids, truncated = tokenize_responses([m["text"] for m in responses], tokenizer, config.seq_len)
        return responses, PromptedSequences(input_ids, [0] * len(input_ids), truncated, 0)
    responses, prompts = with_parent_prompts(responses, messages)
    counts[PARENT_STAGE] = len(responses)
    return responses, tokenize_prompted_responses(prompts, [m["text"] for m in responses], tokenizer, config.seq_len)


def build_dataset(config: PrepareConfig, tokenizer, source: OasstSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """The filtered, tokenized splits and the meta.json that says how they were made."""
    import datasets

    print(f"read {source.description} ({source.shape}); held-out split: {source.split_method}")
    if source.bad_lines:
        print(f"skipped {len(source.bad_lines)} corrupt line(s): {source.bad_lines[:20]}")
    languages = parse_languages(config.lang)
    splits, counts, tokens, truncated, fingerprints = {}, {}, {}, {}, {}
    prompt_tokens, prompts_shortened = {}, {}
    for split in SPLITS:
        kept, split_counts = filter_messages(source.messages_by_split[split], languages)
        counts[split] = {stage: split_counts.get(stage, 0) for stage in FILTER_STAGES}
        if kept:
            kept, sequences = tokenize_split(config, tokenizer, kept, source.messages_by_split[split], counts[split])
        if not kept:
            raise UserError(
                f"no {split} messages are left after the filters (counts: {counts[split]}); check --lang "
                f"('{config.lang}'){' and --context' if config.context != 'none' else ''} and the data file."
            )
        input_ids, truncated[split] = sequences.input_ids, sequences.truncated
        check_tokens_per_response(input_ids, sequences.prompt_lengths, config.tokenizer, split)
        message_ids = [str(m["message_id"]) for m in kept]
        tokens[split] = sum(len(ids) for ids in input_ids)
        prompt_tokens[split], prompts_shortened[split] = sum(sequences.prompt_lengths), sequences.prompts_shortened
        fingerprints[split] = sequences_fingerprint(input_ids, message_ids, sequences.prompt_lengths)
        splits[split] = datasets.Dataset.from_dict(
            {
                "input_ids": input_ids,
                "prompt_length": sequences.prompt_lengths,
                "message_id": message_ids,
                "message_tree_id": [str(m["message_tree_id"]) for m in kept],
            }
        )
        prompted = (
            f" ({prompt_tokens[split]:,} of them prompt, {prompts_shortened[split]:,} prompts shortened)"
            if config.context != "none"
            else ""
        )
        print(
            f"{split}: {len(input_ids):,} responses, {tokens[split]:,} tokens{prompted}, {truncated[split]:,} "
            f"truncated to {config.seq_len}"
        )
    # Named in the fingerprints only when there are prompts: data prepared without them keeps its earlier fingerprints.
    context = () if config.context == "none" else (f"context={config.context}",)
    meta = {
        "source": source.description,
        "source_shape": source.shape,
        "split_method": source.split_method,
        "tokenizer": config.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": config.seq_len,
        "lang": config.lang,
        "context": config.context,
        "counts": counts,
        "sequences": {split: len(splits[split]) for split in SPLITS},
        "tokens": tokens,
        "truncated": truncated,
        **(
            {"prompt_tokens": prompt_tokens, "prompts_shortened": prompts_shortened} if config.context != "none" else {}
        ),
        "bad_lines_skipped": source.bad_lines,
        "fingerprint": combine_fingerprints(
            fingerprints["train"], fingerprints["dev"], fingerprints["test"], config.seq_len, *context
        ),
        # What training reads (train and dev), apart from the test split: a changed test split retrains nothing.
        "training_fingerprint": combine_fingerprints(
            fingerprints["train"], fingerprints["dev"], config.seq_len, *context
        ),
        **{f"{split}_fingerprint": fingerprints[split] for split in SPLITS},
        "config": config_to_dict(config),
    }
    return splits, meta


def save_dataset(
    config: PrepareConfig, source: OasstSource, splits: dict[str, Any], meta: dict[str, Any], output_dir: Path
) -> None:
    """The dataset and its records replace --output-dir in one rename, or nothing changes."""
    import datasets

    needed = sum(
        DATASET_BYTES_PER_TOKEN * meta["tokens"][split] + DATASET_BYTES_PER_RESPONSE * len(splits[split])
        for split in SPLITS
    )
    prompts = opening_prompts(source.messages_by_split["test"], parse_languages(config.lang), PROMPTS_KEPT)
    with disk_space_for(
        output_dir.parent,
        needed,
        "the processed dataset",
        "free some space and run the same command again (an earlier dataset in --output-dir is untouched)",
    ):
        with atomic_directory(output_dir) as staging:
            datasets.DatasetDict(splits).save_to_disk(str(staging))
            atomic_write_json(staging / META_FILE, meta)
            save_config(config, staging / PREPARE_CONFIG_FILE)
            atomic_write_json(staging / "tree_split.json", source.tree_split)
            atomic_write_json(staging / PROMPTS_FILE, prompts)
    print(f"wrote {output_dir} (fingerprint {meta['fingerprint']})")
