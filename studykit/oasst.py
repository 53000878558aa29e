"""Reading OASST1 (hub dataset or local export), filtering assistant responses, and the held-out split."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from studykit.errors import UserError

FLAT = "flat messages"
TREES = "message trees"

# The filter stages, in the order they are applied; meta.json counts what survives each one.
FILTER_STAGES = ("read", "unique", "assistant", "not_deleted", "review_passed", "non_blank", "language")


@dataclass
class OasstSource:
    """Messages per split, plus where they came from and in which shape."""

    description: str
    shape: str
    messages_by_split: dict[str, list[dict[str, Any]]]
    split_method: str
    tree_split: Optional[dict[str, list[str]]] = None
    bad_lines: list[int] = field(default_factory=list)


def _open_text(path: Path):
    # utf-8-sig: Windows editors start a file with a byte-order mark, which is not part of the first record.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def read_jsonl_records(path: Path, skip_bad_lines: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse one JSON object per line; corrupt lines are named by number, or skipped when asked."""
    records: list[dict[str, Any]] = []
    bad_lines: list[int] = []
    try:
        with _open_text(path) as stream:
            for line_number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                if not records and not bad_lines and line.lstrip().startswith("["):
                    # Every line of it would be "corrupt", and --skip-bad-lines would drop the whole file.
                    raise UserError(
                        f"{path} holds one JSON array, but OASST exports are JSON Lines (one message or tree per line); "
                        f"convert it (e.g. `jq -c '.[]' {path} > messages.jsonl`) and pass that file with --data-file."
                    )
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    bad_lines.append(line_number)
                    continue
                if not isinstance(record, dict):
                    bad_lines.append(line_number)
                    continue
                records.append(record)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise UserError(f"{path} is not a readable JSONL file ({error}); pass an OASST export with --data-file.") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror}); pass a readable OASST export with --data-file.") from None
    if bad_lines and not skip_bad_lines:
        shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
        raise UserError(
            f"{path} has {len(bad_lines)} corrupt line(s) (line {shown}); fix them or pass --skip-bad-lines to drop them."
        )
    return records, bad_lines


def detect_shape(record: dict[str, Any], path: Path) -> str:
    if isinstance(record.get("prompt"), dict) and "message_tree_id" in record:
        return TREES
    if all(key in record for key in ("message_id", "message_tree_id", "role", "text")):
        return FLAT
    raise UserError(
        f"{path} is not an OASST export: expected messages with message_id/message_tree_id/role/text or trees with "
        f"message_tree_id/prompt, found keys {sorted(record)[:8]}."
    )


def flatten_tree(tree: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Walk a nested tree depth-first; every message inherits the tree's id."""
    tree_id = tree["message_tree_id"]
    stack = [tree["prompt"]]
    while stack:
        message = stack.pop()
        replies = message.get("replies") or []
        flat = {key: value for key, value in message.items() if key != "replies"}
        flat.setdefault("message_tree_id", tree_id)
        yield flat
        stack.extend(reversed(replies))


def read_local_file(path: Path, skip_bad_lines: bool) -> tuple[str, list[dict[str, Any]], list[int]]:
    if not path.exists():
        raise UserError(f"data file {path} does not exist; pass an OASST export (.jsonl, .jsonl.gz or .parquet) with --data-file.")
    if path.is_dir():
        raise UserError(f"data file {path} is a directory; pass an OASST export file (.jsonl, .jsonl.gz or .parquet) with --data-file.")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several unrelated types for a non-parquet file
            raise UserError(f"{path} is not a readable parquet file ({error}); pass an OASST export with --data-file.") from None
        bad_lines: list[int] = []
    else:
        rows, bad_lines = read_jsonl_records(path, skip_bad_lines)
    if not rows:
        raise UserError(f"{path} holds no records; pass a non-empty OASST export with --data-file.")
    shape = detect_shape(rows[0], path)
    # Every record, not just the first: a stray record would otherwise fail later with a KeyError.
    if any(detect_shape(row, path) != shape for row in rows):
        raise UserError(f"{path} mixes flat messages and message trees; pass one OASST export with --data-file.")
    messages = [message for tree in rows for message in flatten_tree(tree)] if shape == TREES else rows
    return shape, messages, bad_lines


def tree_rank(tree_id: str) -> str:
    """A stable pseudo-random order of trees that does not depend on file order or Python's hash seed."""
    return hashlib.sha256(str(tree_id).encode("utf-8")).hexdigest()


def split_by_tree(messages: list[dict[str, Any]], val_fraction: float) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """Whole conversation trees go to one side, so no tree is on both sides of the held-out split."""
    tree_ids = sorted({str(message["message_tree_id"]) for message in messages}, key=tree_rank)
    if len(tree_ids) < 2:
        raise UserError("the data holds fewer than two conversation trees, too few to hold one out; pass a larger export.")
    validation_count = min(len(tree_ids) - 1, max(1, math.ceil(val_fraction * len(tree_ids))))
    validation_trees = set(tree_ids[:validation_count])
    split = {"train": [], "validation": []}
    for message in messages:
        side = "validation" if str(message["message_tree_id"]) in validation_trees else "train"
        split[side].append(message)
    tree_split = {"train": sorted(set(tree_ids) - validation_trees), "validation": sorted(validation_trees)}
    return split, tree_split


def load_source(data_file: Optional[str], dataset_name: str, val_fraction: float, skip_bad_lines: bool) -> OasstSource:
    if data_file:
        path = Path(data_file)
        shape, messages, bad_lines = read_local_file(path, skip_bad_lines)
        messages_by_split, tree_split = split_by_tree(messages, val_fraction)
        return OasstSource(
            description=str(path),
            shape=shape,
            messages_by_split=messages_by_split,
            split_method=f"by message_tree_id, {val_fraction:.0%} of trees held out",
            tree_split=tree_split,
            bad_lines=bad_lines,
        )
    return OasstSource(
        description=f"hub:{dataset_name}",
        shape=FLAT,
        messages_by_split=load_hub_splits(dataset_name),
        split_method="the dataset's own train and validation splits",
    )


def load_hub_splits(dataset_name: str) -> dict[str, list[dict[str, Any]]]:
    from studykit.hub import ensure_hub_reachable

    ensure_hub_reachable(dataset_name, "--data-file PATH (a local OASST export)", repo_type="dataset")
    import datasets

    dataset_dict = datasets.load_dataset(dataset_name)
    missing = {"train", "validation"} - set(dataset_dict)
    if missing:
        raise UserError(f"hub dataset {dataset_name} lacks split(s) {sorted(missing)}; pass a local export with --data-file.")
    return {split: dataset_dict[split].to_list() for split in ("train", "validation")}


def filter_messages(messages: Iterable[dict[str, Any]], languages: Optional[set[str]]) -> tuple[list[dict[str, Any]], Counter]:
    """Keep assistant responses that are live, passed review, non-blank and in the chosen languages."""
    counts: Counter = Counter()
    seen_ids: set[str] = set()
    kept: list[dict[str, Any]] = []
    for message in messages:
        counts["read"] += 1
        if message["message_id"] in seen_ids:
            continue
        seen_ids.add(message["message_id"])
        counts["unique"] += 1
        if message.get("role") != "assistant":
            continue
        counts["assistant"] += 1
        if message.get("deleted"):
            continue
        counts["not_deleted"] += 1
        if message.get("review_result") is False:
            continue
        counts["review_passed"] += 1
        if not (message.get("text") or "").strip():
            continue
        counts["non_blank"] += 1
        if languages is not None and message.get("lang") not in languages:
            continue
        counts["language"] += 1
        kept.append(message)
    return kept, counts


def opening_prompts(messages: Iterable[dict[str, Any]], languages: Optional[set[str]], count: int) -> list[dict[str, str]]:
    """The first prompter message of up to `count` trees (live, non-blank, in the chosen languages), in a stable
    order that does not depend on file order: fixed held-out prompts for side-by-side samples."""
    opening = {}
    for message in messages:
        if message.get("role") != "prompter" or message.get("parent_id") or message.get("deleted"):
            continue
        if not (message.get("text") or "").strip() or languages is not None and message.get("lang") not in languages:
            continue
        opening.setdefault(str(message["message_tree_id"]), message)
    chosen = sorted(opening.values(), key=lambda message: tree_rank(message["message_tree_id"]))[:count]
    return [{"message_tree_id": str(m["message_tree_id"]), "message_id": str(m["message_id"]), "text": m["text"]} for m in chosen]


def parse_languages(lang: str) -> Optional[set[str]]:
    """`all` keeps every language; otherwise a comma-separated list such as `en,de`."""
    if lang.strip().lower() == "all":
        return None
    return {code.strip() for code in lang.split(",") if code.strip()}
