"""Reading OASST (hub dataset or local export), filtering assistant responses, and the held-out split.

A local export is read line by line (row by row for parquet), and each record is checked against the published
schema's types for the fields the kit uses: a bad line is refused, or skipped when asked, by its number.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from studykit.errors import UserError

FLAT = "flat messages"
TREES = "message trees"

# The filter stages, in the order they are applied; meta.json counts what survives each one.
FILTER_STAGES = ("read", "unique", "assistant", "not_deleted", "review_passed", "non_blank", "language")
# The stage --context parent adds after them: the response's parent is a prompter message with text, in the export.
PARENT_STAGE = "parent_prompt"


@dataclass
class OasstSource:
    """Messages per split, plus where they came from and in which shape."""

    description: str
    shape: str
    messages_by_split: dict[str, list[dict[str, Any]]]
    split_method: str
    tree_split: dict[str, list[str]] = field(default_factory=dict)
    bad_lines: list[int] = field(default_factory=list)


class CorruptRecord(ValueError):
    """Why one line (or parquet row) cannot be used; the reader collects these and names each by its number."""


@dataclass(frozen=True)
class FieldRule:
    """What one field of a record must hold; `expected` says it in the words of an error message."""

    types: tuple[type, ...]
    expected: str
    required: bool = False
    non_empty: bool = False


NULL = type(None)
# The fields the filters, the split and the dataset read, with the types of the published schema (oasst_data's
# schemas.py). Other fields (labels, emojis, detoxify, events, user_id, ...) pass through unchecked: nothing here
# reads them, and the hub's parquet stores some of them as structs of lists.
MESSAGE_FIELDS = {
    "message_id": FieldRule((str,), "a non-empty string", required=True, non_empty=True),
    "role": FieldRule((str,), "a string", required=True),
    "text": FieldRule((str, NULL), "a string or null", required=True),
    "parent_id": FieldRule((str, NULL), "a string or null"),
    "lang": FieldRule((str, NULL), "a string or null"),
    "deleted": FieldRule((bool, NULL), "true, false or null"),
    "review_result": FieldRule((bool, NULL), "true, false or null"),
    "replies": FieldRule((list, NULL), "a list of messages or null"),
}
TREE_ID_RULE = FieldRule((str,), "a non-empty string", required=True, non_empty=True)
FLAT_MESSAGE_FIELDS = {**MESSAGE_FIELDS, "message_tree_id": TREE_ID_RULE}
# Published trees files leave message_tree_id null on every nested message: the id lives on the tree.
NESTED_MESSAGE_FIELDS = {**MESSAGE_FIELDS, "message_tree_id": FieldRule((str, NULL), "its tree's id or null")}
TREE_FIELDS = {"message_tree_id": TREE_ID_RULE, "prompt": FieldRule((dict, NULL), "a message or null", required=True)}

UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
# How much of a value or a list of line numbers an error message quotes.
SHOWN_CHARS, SHOWN_KEYS, SHOWN_NUMBERS = 40, 8, 10


@dataclass
class NumberedRecord:
    """One non-blank line (or parquet row): its number, counting from 1, and its JSON value or why it has none."""

    number: int
    value: Any = None
    unreadable: Optional[str] = None


def shown(value: Any) -> str:
    """A value as an error message quotes it: JSON (every newline and lone surrogate escaped), cut short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        quoted = json.dumps(value[:SHOWN_CHARS])
        return quoted[:-1] + '..."' if len(value) > SHOWN_CHARS else quoted
    # Parquet cells can be bytes, dates or decimals, which JSON has no spelling for.
    quoted = json.dumps(value) if isinstance(value, (bool, int, float, NULL)) else type(value).__name__
    return quoted if len(quoted) <= SHOWN_CHARS else quoted[:SHOWN_CHARS] + "..."


def shown_keys(record: dict[str, Any]) -> str:
    keys = sorted(str(key) for key in record)
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return json.dumps([key[:SHOWN_CHARS] for key in keys[:SHOWN_KEYS]]) + more


def encodes_as_utf8(text: str) -> bool:
    """False for a lone surrogate ("\\ud800" in JSON), which the tokenizer and the dataset's arrow files reject."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_fields(record: dict[str, Any], rules: dict[str, FieldRule]) -> None:
    for name, rule in rules.items():
        if name not in record:
            if rule.required:
                raise CorruptRecord(f"{name} is missing")
            continue
        value = record[name]
        if not isinstance(value, rule.types) or (rule.non_empty and not value):
            raise CorruptRecord(f"{name} must be {rule.expected}, not {shown(value)}")
        if isinstance(value, str) and not encodes_as_utf8(value):
            raise CorruptRecord(f"{name} holds a lone surrogate ({shown(value)}), which UTF-8 cannot encode")


def record_shape(record: dict[str, Any]) -> Optional[str]:
    """The shape a record claims by its keys, as oasst_data's reader decides it; None for neither. A tree whose
    prompt is null is still a tree (one with no messages)."""
    if "message_id" in record:
        return FLAT
    if "prompt" in record:
        return TREES
    return None


def node_name(node: dict[str, Any], depth: int) -> str:
    message_id = node.get("message_id")
    if isinstance(message_id, str) and message_id and encodes_as_utf8(message_id):
        return f"message {shown(message_id)}"
    return "the prompt" if depth == 0 else f"a reply at depth {depth}"


def flatten_tree(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages of one tree, depth-first, each carrying the tree's id (and its state where its own is null), as
    a flat messages export does. Raises CorruptRecord for the first thing wrong anywhere in the tree."""
    check_fields(tree, TREE_FIELDS)
    tree_id = tree["message_tree_id"]
    messages: list[dict[str, Any]] = []
    # A stack, not recursion: a tree nested hundreds of replies deep is valid JSON.
    stack = [] if tree["prompt"] is None else [(tree["prompt"], 0)]
    while stack:
        node, depth = stack.pop()
        where = node_name(node, depth)
        try:
            check_fields(node, NESTED_MESSAGE_FIELDS)
        except CorruptRecord as problem:
            raise CorruptRecord(f"{where}: {problem}") from None
        own_tree_id = node.get("message_tree_id")
        if own_tree_id is not None and own_tree_id != tree_id:
            raise CorruptRecord(f"{where} has message_tree_id {shown(own_tree_id)}, but its tree is {shown(tree_id)}")
        replies = node.get("replies") or []
        for reply in replies:
            if not isinstance(reply, dict):
                raise CorruptRecord(f"{where}: replies must hold messages, not {shown(reply)}")
        message = {key: value for key, value in node.items() if key != "replies"}
        message["message_tree_id"] = tree_id
        if message.get("tree_state") is None:
            message["tree_state"] = tree.get("tree_state")
        messages.append(message)
        stack.extend((reply, depth + 1) for reply in reversed(replies))
    return messages


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", list: "list", int: "number", float: "number"}.get(type(value), type(value).__name__)


def record_messages(record: NumberedRecord) -> tuple[str, list[dict[str, Any]]]:
    """The shape of one record and the messages it holds; raises CorruptRecord if it is not a valid one."""
    if record.unreadable is not None:
        raise CorruptRecord(record.unreadable)
    value = record.value
    if not isinstance(value, dict):
        raise CorruptRecord(f"a JSON {json_type(value)}, not an object")
    shape = record_shape(value)
    if shape is None:
        raise CorruptRecord(
            f"neither a message (no message_id) nor a tree (no prompt); its keys are {shown_keys(value)}"
        )
    if shape == TREES:
        return TREES, flatten_tree(value)
    check_fields(value, FLAT_MESSAGE_FIELDS)
    return FLAT, [value]


def shown_numbers(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:SHOWN_NUMBERS])) + (" ..." if len(numbers) > SHOWN_NUMBERS else "")


def check_records(
    path: Path, records: list[NumberedRecord], unit: str, skip_bad_lines: bool
) -> tuple[str, list[dict[str, Any]], list[int]]:
    """The file's shape, the messages of its valid records and the numbers of the others. Every refusal that is
    about particular lines (or rows) names their numbers."""
    if not records:
        raise UserError(f"{path} holds no records; pass a non-empty OASST export with --data-file.")
    valid: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {FLAT: [], TREES: []}
    corrupt: list[tuple[int, str]] = []
    for record in records:
        try:
            shape, messages = record_messages(record)
        except CorruptRecord as problem:
            corrupt.append((record.number, str(problem)))
        else:
            valid[shape].append((record.number, messages))
    if not valid[FLAT] and not valid[TREES]:
        number, problem = corrupt[0]
        raise UserError(
            f"{path} is not an OASST export: no {unit} holds a valid message (message_id, message_tree_id, role, "
            f"text) or tree (message_tree_id, prompt); {unit} {number}: {problem}; pass an OASST messages or trees "
            f"export with --data-file."
        )
    if valid[FLAT] and valid[TREES]:
        # The shape of fewer records is the stray one; on a tie, the one that starts later.
        major, minor = sorted((FLAT, TREES), key=lambda shape: (-len(valid[shape]), valid[shape][0][0]))
        raise UserError(
            f"{path} mixes flat messages and message trees ({len(valid[major])} {unit}(s) of {major}, "
            f"{len(valid[minor])} of {minor}, the first on {unit} {valid[minor][0][0]}); pass one OASST export "
            f"with --data-file."
        )
    shape = FLAT if valid[FLAT] else TREES
    bad_numbers = [number for number, _ in corrupt]
    if corrupt and not skip_bad_lines:
        whole_trees = " (each is a whole tree)" if shape == TREES else ""
        raise UserError(
            f"{path} has {len(corrupt)} corrupt {unit}(s) ({unit} {shown_numbers(bad_numbers)}); "
            f"{unit} {corrupt[0][0]}: {corrupt[0][1]}; fix them or pass --skip-bad-lines to drop them{whole_trees}."
        )
    messages = [message for _, messages_of_record in valid[shape] for message in messages_of_record]
    if not messages:
        raise UserError(
            f"{path} holds {len(valid[shape])} message tree(s) but no messages (every prompt is null); "
            "pass an export that holds messages with --data-file."
        )
    return shape, messages, bad_numbers


def parse_json_line(number: int, line: bytes) -> NumberedRecord:
    """Decoding per line, so one bad byte makes one numbered corrupt line rather than an unreadable file."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        where = f"byte 0x{line[error.start]:02x} at position {error.start + 1}"
        return NumberedRecord(number, unreadable=f"not UTF-8 text ({where})")
    try:
        return NumberedRecord(number, json.loads(text))
    except json.JSONDecodeError as error:
        return NumberedRecord(number, unreadable=f"not valid JSON ({error.msg} at column {error.colno})")
    except ValueError:
        # json.loads's only other ValueError: an integer longer than Python converts (4300 digits).
        return NumberedRecord(number, unreadable="a JSON number with more digits than Python reads")
    except RecursionError:
        return NumberedRecord(number, unreadable="JSON nested deeper than Python reads")


def open_binary(path: Path):
    if not path.name.endswith(".gz"):
        return open(path, "rb")
    with open(path, "rb") as probe:
        magic = probe.read(len(GZIP_MAGIC))
    if magic and magic != GZIP_MAGIC:
        raise UserError(
            f"{path} is not gzip data although its name ends in .gz; rename it without .gz if it is "
            "JSON Lines, or download or copy it again."
        )
    return gzip.open(path, "rb")


def holds_json_array(records: list[NumberedRecord], first_line: bytes, last_line: bytes) -> bool:
    """One array on one line, or spread over many (its first line alone is not JSON, its last closes it): every
    line of it would be "corrupt", and --skip-bad-lines would drop the whole file."""
    if not first_line.lstrip().startswith(b"["):
        return False
    return len(records) == 1 or (records[0].unreadable is not None and last_line.rstrip().endswith(b"]"))


def read_jsonl_records(path: Path, skip_bad_lines: bool) -> tuple[str, list[dict[str, Any]], list[int]]:
    """One JSON object per line, split on b"\\n" only: the file's shape, the messages of its valid lines (trees
    flattened) and the numbers of corrupt lines, which are refused by number unless skip_bad_lines."""
    records: list[NumberedRecord] = []
    first_line = last_line = b""
    try:
        with open_binary(path) as stream:
            for number, line in enumerate(stream, start=1):
                if number == 1 and line.startswith(UTF8_BOM):
                    # Windows editors start a file with a byte-order mark, which is not part of the first record.
                    line = line[len(UTF8_BOM) :]
                if not line.strip():
                    continue
                first_line, last_line = first_line or line, line
                records.append(parse_json_line(number, line))
    except EOFError:
        raise UserError(
            f"{path} is damaged: its gzip data ends early (the file was cut short); download or copy it "
            "again and pass it with --data-file."
        ) from None
    except (gzip.BadGzipFile, zlib.error) as error:
        detail = " ".join(str(error).split())[:120]
        raise UserError(
            f"{path} is damaged: its gzip data is corrupt ({detail}); download or copy it again and pass "
            "it with --data-file."
        ) from None
    except OSError as error:
        raise UserError(
            f"cannot read {path} ({error.strerror or error}); pass a readable OASST export with --data-file."
        ) from None
    if records and holds_json_array(records, first_line, last_line):
        raise UserError(
            f"{path} holds one JSON array, but OASST exports are JSON Lines (one message or tree per line); "
            f"convert it (e.g. `jq -c '.[]' {path} > messages.jsonl`) and pass that file with --data-file."
        )
    return check_records(path, records, "line", skip_bad_lines)


def read_parquet_records(path: Path, skip_bad_lines: bool) -> tuple[str, list[dict[str, Any]], list[int]]:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a non-parquet file
        detail = " ".join(str(error).split())[:200]
        raise UserError(
            f"{path} is not a readable parquet file ({detail}); pass an OASST export with --data-file."
        ) from None
    records = [NumberedRecord(number, row) for number, row in enumerate(rows, start=1)]
    return check_records(path, records, "row", skip_bad_lines)


def read_local_file(path: Path, skip_bad_lines: bool) -> tuple[str, list[dict[str, Any]], list[int]]:
    """The shape of an OASST export, its messages (ids and tree ids strings) and the numbers of lines skipped."""
    if not path.exists():
        raise UserError(
            f"data file {path} does not exist; pass an OASST export (.jsonl, .jsonl.gz or .parquet) with --data-file."
        )
    if path.is_dir():
        raise UserError(
            f"data file {path} is a directory; pass an OASST export file (.jsonl, .jsonl.gz or .parquet) "
            "with --data-file."
        )
    if path.suffix == ".parquet":
        return read_parquet_records(path, skip_bad_lines)
    return read_jsonl_records(path, skip_bad_lines)


def tree_rank(tree_id: str) -> str:
    """A stable pseudo-random order of trees that does not depend on file order or Python's hash seed."""
    return hashlib.sha256(str(tree_id).encode("utf-8")).hexdigest()


def split_by_tree(
    messages: list[dict[str, Any]], held_out_fraction: float, what: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]:
    """Whole conversation trees go to one side: (kept messages, held-out messages, kept tree ids, held-out tree ids).

    Trees are ranked by a hash of their id, so the split depends neither on file order nor on Python's hash seed, and
    the same trees are held out every time. `what` names the held-out side in the error for too few trees."""
    tree_ids = sorted({str(message["message_tree_id"]) for message in messages}, key=tree_rank)
    if len(tree_ids) < 2:
        raise UserError(
            f"the data holds fewer than two conversation trees, too few to hold one out as {what}; pass a larger "
            "export."
        )
    held_out_count = min(len(tree_ids) - 1, max(1, math.ceil(held_out_fraction * len(tree_ids))))
    held_out_trees = set(tree_ids[:held_out_count])
    kept, held_out = [], []
    for message in messages:
        (held_out if str(message["message_tree_id"]) in held_out_trees else kept).append(message)
    return kept, held_out, sorted(set(tree_ids) - held_out_trees), sorted(held_out_trees)


def three_way_split(
    train_side: list[dict[str, Any]],
    test: list[dict[str, Any]],
    dev_fraction: float,
    test_trees: Optional[list[str]] = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """The dev split is carved out of the training side by conversation tree; train, dev and test share no tree."""
    train, dev, train_trees, dev_trees = split_by_tree(train_side, dev_fraction, "the dev split")
    test_trees = test_trees if test_trees is not None else sorted({str(message["message_tree_id"]) for message in test})
    return {"train": train, "dev": dev, "test": test}, {"train": train_trees, "dev": dev_trees, "test": test_trees}


def load_source(
    data_file: Optional[str], dataset_name: str, test_fraction: float, dev_fraction: float, skip_bad_lines: bool
) -> OasstSource:
    """Messages of the three splits: test is the hub dataset's validation split, or a local file's held-out trees;
    dev is carved out of what remains for training. Only training reads dev; only evaluation reads test."""
    dev_method = f"dev: {dev_fraction:.0%} of the training trees"
    if data_file:
        path = Path(data_file)
        shape, messages, bad_lines = read_local_file(path, skip_bad_lines)
        train_side, test, _, test_trees = split_by_tree(messages, test_fraction, "the test split")
        messages_by_split, tree_split = three_way_split(train_side, test, dev_fraction, test_trees)
        return OasstSource(
            description=str(path),
            shape=shape,
            messages_by_split=messages_by_split,
            split_method=f"by message_tree_id: test {test_fraction:.0%} of the trees, {dev_method}",
            tree_split=tree_split,
            bad_lines=bad_lines,
        )
    hub = load_hub_splits(dataset_name)
    messages_by_split, tree_split = three_way_split(hub["train"], hub["validation"], dev_fraction)
    return OasstSource(
        description=f"hub:{dataset_name}",
        shape=FLAT,
        messages_by_split=messages_by_split,
        split_method=f"test: the dataset's own validation split; {dev_method} of its train split",
        tree_split=tree_split,
    )


def load_hub_splits(dataset_name: str) -> dict[str, list[dict[str, Any]]]:
    from studykit.hub import ensure_hub_reachable

    ensure_hub_reachable(dataset_name, "--data-file PATH (a local OASST export)", repo_type="dataset")
    import datasets

    dataset_dict = datasets.load_dataset(dataset_name)
    missing = {"train", "validation"} - set(dataset_dict)
    if missing:
        raise UserError(
            f"hub dataset {dataset_name} lacks split(s) {sorted(missing)}; pass a local export with --data-file."
        )
    return {split: dataset_dict[split].to_list() for split in ("train", "validation")}


def filter_messages(
    messages: Iterable[dict[str, Any]], languages: Optional[set[str]]
) -> tuple[list[dict[str, Any]], Counter]:
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


def with_parent_prompts(
    responses: list[dict[str, Any]], messages: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The responses whose parent is a non-blank prompter message of `messages`, and those parents' texts.

    A response without one (its parent an assistant message, or missing from the export, as when a tree was cut short
    or its prompt failed to parse) is dropped rather than kept with an empty prompt: under --context parent every
    response is then conditioned the same way. The parent's own review and deletion are not judged: the response,
    which passed the filters, was written as the answer to that text. Splits are made by tree, so a parent lies in
    its response's split."""
    by_id: dict[str, dict[str, Any]] = {}
    for message in messages:
        by_id.setdefault(str(message["message_id"]), message)
    kept, prompts = [], []
    for response in responses:
        parent = by_id.get(str(response.get("parent_id")))
        if parent is None or parent.get("role") != "prompter" or not (parent.get("text") or "").strip():
            continue
        kept.append(response)
        prompts.append(parent["text"])
    return kept, prompts


def opening_prompts(
    messages: Iterable[dict[str, Any]], languages: Optional[set[str]], count: int
) -> list[dict[str, str]]:
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
    return [
        {"message_tree_id": str(m["message_tree_id"]), "message_id": str(m["message_id"]), "text": m["text"]}
        for m in chosen
    ]


def parse_languages(lang: str) -> Optional[set[str]]:
    """`all` keeps every language; otherwise a comma-separated list such as `en,de`."""
    if lang.strip().lower() == "all":
        return None
    return {code.strip() for code in lang.split(",") if code.strip()}
