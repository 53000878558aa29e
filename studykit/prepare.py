"""Stage 1: OASST1 -> filtered, tokenized, unpadded sequences on disk, with a meta.json that says how."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from studykit.config import PrepareConfig, config_to_dict, print_config, save_config
from studykit.data import META_FILE, SPLITS, combine_fingerprints, sequences_fingerprint, tokenize_responses, tokenizer_fingerprint
from studykit.errors import UserError
from studykit.io import atomic_directory, atomic_write_json, check_writable_location, visible_entries
from studykit.modeling import load_tokenizer
from studykit.oasst import FILTER_STAGES, load_source, filter_messages, opening_prompts, parse_languages

# A tokenizer's model_max_length above this is a placeholder, not a real context length.
UNSET_CONTEXT = 1_000_000
# Opening prompts of validation trees, kept as text: the processed data holds only tokenized responses.
PROMPTS_FILE = "prompts.json"
PROMPTS_KEPT = 16
# Written beside meta.json; the two together mark a directory as a dataset this stage made.
PREPARE_CONFIG_FILE = "prepare_config.json"


def check_dataset_directory(output_dir: Path) -> None:
    """Creates nothing. The new dataset replaces the whole directory in one rename, so a directory holding anything
    but an earlier prepared dataset (a model, someone's files) is refused rather than deleted."""
    check_writable_location(output_dir, "--output-dir")
    # The rename that puts the dataset in place happens in the parent.
    check_writable_location(output_dir.parent, "--output-dir")
    holds_dataset = (output_dir / META_FILE).is_file() and (output_dir / PREPARE_CONFIG_FILE).is_file()
    others = visible_entries(output_dir)
    if others and not holds_dataset:
        raise UserError(f"{output_dir} is not empty and holds no prepared dataset ({', '.join(others[:3])}); "
                        "choose an empty or new --output-dir.")


def check_seq_len(seq_len: int, tokenizer, tokenizer_name: str) -> None:
    context = getattr(tokenizer, "model_max_length", None)
    if context and context < UNSET_CONTEXT and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds the context of '{tokenizer_name}' ({context} tokens); pass --seq-len {context} or less.")


def prepare(config: PrepareConfig) -> dict[str, Any]:
    import datasets

    print_config(config)
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    check_dataset_directory(output_dir)
    tokenizer = load_tokenizer(config.tokenizer, "--tokenizer")
    check_seq_len(config.seq_len, tokenizer, config.tokenizer)
    source = load_source(config.data_file, config.dataset, config.val_fraction, config.skip_bad_lines)
    print(f"read {source.description} ({source.shape}); held-out split: {source.split_method}")
    if source.bad_lines:
        print(f"skipped {len(source.bad_lines)} corrupt line(s): {source.bad_lines[:20]}")

    languages = parse_languages(config.lang)
    splits, counts, tokens, truncated, fingerprints = {}, {}, {}, {}, {}
    for split in SPLITS:
        kept, split_counts = filter_messages(source.messages_by_split[split], languages)
        counts[split] = {stage: split_counts.get(stage, 0) for stage in FILTER_STAGES}
        if not kept:
            raise UserError(
                f"no {split} messages are left after the filters (counts: {counts[split]}); check --lang "
                f"('{config.lang}') and the data file."
            )
        input_ids, truncated[split] = tokenize_responses([m["text"] for m in kept], tokenizer, config.seq_len)
        message_ids = [str(m["message_id"]) for m in kept]
        tokens[split] = sum(len(ids) for ids in input_ids)
        fingerprints[split] = sequences_fingerprint(input_ids, message_ids)
        splits[split] = datasets.Dataset.from_dict(
            {"input_ids": input_ids, "message_id": message_ids, "message_tree_id": [str(m["message_tree_id"]) for m in kept]}
        )
        print(f"{split}: {len(input_ids):,} responses, {tokens[split]:,} tokens, {truncated[split]:,} truncated to {config.seq_len}")

    meta = {
        "source": source.description,
        "source_shape": source.shape,
        "split_method": source.split_method,
        "tokenizer": config.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "seq_len": config.seq_len,
        "lang": config.lang,
        "counts": counts,
        "sequences": {split: len(splits[split]) for split in SPLITS},
        "tokens": tokens,
        "truncated": truncated,
        "bad_lines_skipped": source.bad_lines,
        "fingerprint": combine_fingerprints(fingerprints["train"], fingerprints["validation"], config.seq_len),
        "train_fingerprint": fingerprints["train"],
        "validation_fingerprint": fingerprints["validation"],
        "config": config_to_dict(config),
        "seconds": round(time.perf_counter() - started, 3),
    }
    with atomic_directory(output_dir) as staging:
        datasets.DatasetDict(splits).save_to_disk(str(staging))
        atomic_write_json(staging / META_FILE, meta)
        save_config(config, staging / PREPARE_CONFIG_FILE)
        if source.tree_split is not None:
            atomic_write_json(staging / "tree_split.json", source.tree_split)
        atomic_write_json(staging / PROMPTS_FILE, opening_prompts(source.messages_by_split["validation"], languages, PROMPTS_KEPT))
    print(f"wrote {output_dir} (fingerprint {meta['fingerprint']})")
    return meta
