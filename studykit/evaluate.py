"""Stage 4: held-out perplexity of the base model and of every finished run under --checkpoints."""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from studykit import locks
from studykit.batching import resolve_pad_multiple
from studykit.config import print_config, save_config
from studykit.data import check_tokenizer_matches, load_processed, split_prompt_lengths, tokenize_responses
from studykit.errors import UserError
from studykit.io import (
    MIB,
    atomic_write_json,
    atomic_write_text,
    check_writable_location,
    disk_space_for,
    ensure_writable_directory,
    find_partial_directories,
    require_free_space,
)
from studykit.loss import resolve_loss_kernel, use_loss_kernel
from studykit.metrics import SequenceScores, score_sequences
from studykit.modeling import (
    base_model_fingerprint,
    check_checkpoint_files,
    check_model_fits_tokenizer,
    count_parameters,
    is_adapter_directory,
    is_full_model_directory,
    load_base_model,
    load_checkpoint_for_eval,
    load_tokenizer,
)
from studykit.response_scores import EXTRA_EVAL_PREFIX, PER_RESPONSE_FILE, save_per_response_scores
from studykit.run_dir import RUN_RECORD, is_run_directory, load_run_record
from studykit.run_state import RunRecord
from studykit.runtime import autocast_for, default_device
from studykit.study_config import EvalConfig


@dataclass
class EvalTarget:
    name: str
    method: str
    path: Optional[Path]
    run_record: Optional[RunRecord]


def find_runs(checkpoints: Path, names: Sequence[str] = ()) -> list[EvalTarget]:
    """The finished runs under `checkpoints` (those named in `names`, when given), told apart from other directories
    by their files: an adapter config or a model config with weights, and a run record."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        raise UserError(
            f"--checkpoints {checkpoints} is not a directory; pass the directory that holds your training runs "
            "(each run's --output-dir inside it)."
        )
    for partial in find_partial_directories(checkpoints):
        print(f"warning: skipping {partial}, an unfinished write left by a crash.")
    targets = []
    missing = [name for name in names if not (checkpoints / name).is_dir()]
    if missing:
        raise UserError(
            f"--runs names {missing}, which --checkpoints {checkpoints} does not hold; pass the names of its run "
            "directories."
        )
    for run_dir in sorted(
        p for p in checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".") and (not names or p.name in names)
    ):
        finished = (run_dir / RUN_RECORD).exists()
        has_weights = (
            (run_dir / "adapter_model.safetensors").exists()
            if is_adapter_directory(run_dir)
            else is_full_model_directory(run_dir)
        )
        if not (has_weights or is_adapter_directory(run_dir) or is_run_directory(run_dir)):
            continue
        if not finished:
            print(
                f"warning: skipping {run_dir}: it has no {RUN_RECORD}, so its training did not finish "
                "(run its training command again with --resume to finish it)."
            )
            continue
        if not has_weights:
            raise UserError(
                f"{run_dir} is a finished run without its weights (no .safetensors file); train it again "
                "or move it out of --checkpoints."
            )
        record = load_run_record(run_dir)
        check_checkpoint_files(run_dir)
        targets.append(EvalTarget(run_dir.name, record.method, run_dir, record))
    return targets


def evaluate(config: EvalConfig) -> list[dict[str, Any]]:
    print_config(config)
    check_writable_location(Path(config.output_dir), "--output-dir")
    with locks.exclusive(Path(config.output_dir), "--output-dir"):
        return evaluate_holding_lock(config)


def evaluate_holding_lock(config: EvalConfig) -> list[dict[str, Any]]:
    device = default_device()
    loss_kernel = resolve_loss_kernel(config.loss_kernel, device.type)
    # Saved as resolved in eval_config.json, beside the scores it gave.
    pad_multiple = resolve_pad_multiple(config.pad_to_multiple_of, device.type)
    config = dataclasses.replace(config, pad_to_multiple_of=pad_multiple)
    data = load_processed(config.data_dir)
    tokenizer_name = config.tokenizer or config.model
    tokenizer = load_tokenizer(
        tokenizer_name, "--tokenizer" if config.tokenizer else "--model", config.trust_remote_code
    )
    check_tokenizer_matches(data, tokenizer, tokenizer_name)
    extra_sequences = load_extra_eval(config.extra_eval, tokenizer, data.meta["seq_len"]) if config.extra_eval else None
    runs = find_runs(Path(config.checkpoints), config.runs)
    if not runs and not config.include_base:
        raise UserError(
            f"nothing to evaluate: no finished runs in {config.checkpoints}; train one first or drop --no-include-base."
        )
    if not runs:
        print(f"warning: no finished runs in {config.checkpoints}; only the base model is scored.")
    targets = ([EvalTarget("base", "base", None, None)] if config.include_base else []) + runs
    check_adapter_bases(
        [target for target in targets if target.path is not None and is_adapter_directory(target.path)], config
    )
    # Checked after the inputs, so a mistake in them creates nothing, and before scoring, so no work is lost.
    output_dir = ensure_writable_directory(Path(config.output_dir), "--output-dir")
    # The scores: 16 bytes per response and scored model, plus the JSON and Markdown beside them.
    needed = 16 * (len(data.test) + len(extra_sequences or [])) * len(targets) + MIB
    space = (
        output_dir,
        needed,
        "the evaluation results",
        "free some space and run the same command again (the previous results are untouched)",
    )
    require_free_space(*space)

    autocast = autocast_for(device, config.precision)
    sequences = list(data.test["input_ids"])
    # Prompt tokens (--context parent) condition their responses but are never scored: each row's NLL and tokens are
    # its response's.
    prompt_lengths = split_prompt_lengths(data.test)
    rows, scores_by_name = [], {}
    for target in targets:
        started = time.perf_counter()
        model = load_target(target, config)
        check_model_fits_tokenizer(model, tokenizer, str(target.path or config.model), tokenizer_name)
        model.to(device)
        use_loss_kernel(model, loss_kernel)
        scores = score_sequences(
            model,
            sequences,
            config.batch_size,
            device,
            tokenizer.pad_token_id,
            autocast,
            progress=lambda batches, name=target.name: tqdm(batches, desc=f"scoring {name}", leave=False),
            pad_to_multiple_of=config.pad_to_multiple_of,
            prompt_lengths=prompt_lengths,
        )
        row = build_row(target, model, scores, data.meta, time.perf_counter() - started)
        row["loss_kernel"] = loss_kernel
        scores_by_name[target.name] = scores
        print(f"{target.name}: perplexity {scores.perplexity:.4f} over {scores.tokens:,} tokens")
        if extra_sequences is not None:
            extra_scores = score_sequences(
                model,
                extra_sequences,
                config.batch_size,
                device,
                tokenizer.pad_token_id,
                autocast,
                pad_to_multiple_of=config.pad_to_multiple_of,
            )
            scores_by_name[EXTRA_EVAL_PREFIX + target.name] = extra_scores
            row.update(
                extra_eval=config.extra_eval,
                extra_eval_perplexity=extra_scores.perplexity,
                extra_eval_tokens=extra_scores.tokens,
            )
            print(
                f"{target.name}: {config.extra_eval} perplexity {extra_scores.perplexity:.4f} over "
                f"{extra_scores.tokens:,} tokens"
            )
        rows.append(row)
        del model

    with disk_space_for(*space):
        # The largest file first: if it does not fit, the previous results are all still there.
        save_per_response_scores(
            output_dir / PER_RESPONSE_FILE,
            scores_by_name,
            list(data.test["message_id"]),
            list(data.test["message_tree_id"]),
        )
        atomic_write_json(output_dir / "perplexity.json", rows)
        table = format_results_table(rows)
        atomic_write_text(output_dir / "results.md", table)
        save_config(config, output_dir / "eval_config.json")
    print(table)
    return rows


def format_params(count: int) -> str:
    return f"{count:,}" if count else "0 (frozen)"


def format_results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Method | Trainable params | Perplexity |", "|---|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['name']} ({row['method']}) | {format_params(row['trainable_params'])} | {row['perplexity']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def load_extra_eval(source: str, tokenizer, seq_len: int) -> list[list[int]]:
    """General text, tokenized exactly like the responses: EOS appended, cut to the data's seq_len."""
    texts = read_extra_eval_texts(source)
    if not texts:
        raise UserError(f"--extra-eval {source} holds no text; pass a text file or a dataset with a 'text' column.")
    sequences, _ = tokenize_responses(texts, tokenizer, seq_len)
    print(f"extra evaluation set {source}: {len(sequences):,} texts")
    return sequences


def read_extra_eval_texts(source: str) -> list[str]:
    """A local text file (paragraphs where blank lines separate them, else lines) or a hub dataset
    NAME:CONFIG[:SPLIT]."""
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--extra-eval {path} is not a UTF-8 text file; pass a plain text file.") from None
        blank_line = re.compile(r"\n[ \t]*\n")
        blocks = blank_line.split(text) if blank_line.search(text) else text.splitlines()
        return [block.strip() for block in blocks if block.strip()]
    if path.is_dir():
        raise UserError(
            f"--extra-eval {path} is a directory; pass a text file or a hub dataset such as wikitext:wikitext-2-raw-v1."
        )
    from studykit.hub import ensure_hub_reachable

    name, _, rest = source.partition(":")
    dataset_config, _, split = rest.partition(":")
    ensure_hub_reachable(name, "--extra-eval PATH (a local text file)", repo_type="dataset")
    import datasets

    dataset = datasets.load_dataset(name, dataset_config or None, split=split or "test")
    if "text" not in dataset.column_names:
        raise UserError(
            f"--extra-eval {source} has no 'text' column (columns: {dataset.column_names}); pass a text dataset or "
            "file."
        )
    return [text.strip() for text in dataset["text"] if text and text.strip()]


def check_adapter_bases(adapters: list[EvalTarget], config: EvalConfig) -> None:
    """Adapters are applied to --model (the 'base' row), so each must have been trained on exactly that model."""
    recorded = [target for target in adapters if target.run_record.base_model_fingerprint]
    if not recorded:
        return
    fingerprint = base_model_fingerprint(load_base_model(config.model, "--model", config.trust_remote_code))
    for target in recorded:
        if target.run_record.base_model_fingerprint != fingerprint:
            raise UserError(
                f"the adapter in {target.path} was trained on another base model ('{target.run_record.base_model}') "
                f"than --model '{config.model}'; evaluate it with that --model, or move it out of --checkpoints."
            )


def load_target(target: EvalTarget, config: EvalConfig):
    if target.method == "base":
        return load_base_model(config.model, "--model", config.trust_remote_code)
    return load_checkpoint_for_eval(target.path, config.model, config.trust_remote_code)


def build_row(target: EvalTarget, model, scores: SequenceScores, data_meta: dict, seconds: float) -> dict[str, Any]:
    record = target.run_record
    _, total = count_parameters(model)
    row = {
        "name": target.name,
        "method": target.method,
        "trainable_params": record.trainable_params if record else 0,
        "total_params": record.total_params if record else total,
        "perplexity": scores.perplexity,
        "nll_sum": scores.nll_sum,
        "tokens": scores.tokens,
        "responses": int(len(scores.nll_sums)),
        "test_fingerprint": data_meta["test_fingerprint"],
        "eval_seconds": seconds,
        "path": str(target.path) if target.path else None,
    }
    if record and record.training_data_fingerprint != data_meta["training_fingerprint"]:
        print(f"warning: {target.name} was trained with another dataset ({record.data_dir}) than the one evaluated.")
        row["trained_on_other_data"] = True
    return row
