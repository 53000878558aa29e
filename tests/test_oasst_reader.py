"""The OASST reader on files shaped like the published exports, and on anything else a file can hold.

The promise: a file is either read (every message with string ids, in its own tree) or refused with one line that
says what is wrong, never a traceback. Refusals about particular lines name their numbers ("line N", "row N" for
parquet): corrupt lines, "is not an OASST export" (the first line and what it holds) and "mixes flat messages and
message trees" (the first line of the stray shape). Refusals about the file as a whole name none: "holds no
records", "holds one JSON array", "holds N message tree(s) but no messages", "is damaged" and "is not gzip data".
"""

import contextlib
import copy
import gzip
import io
import json
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PREPARE, refused
from studykit.config import PrepareConfig
from studykit.errors import UserError
from studykit.oasst import FLAT, TREES, filter_messages, opening_prompts, parse_languages, read_local_file, split_by_tree

# ---------------------------------------------------------------------------------------------------------
# A file shaped exactly like a published OASST2 trees export (oasst_data's schemas.py, the hub dataset card)
# ---------------------------------------------------------------------------------------------------------


def oasst_id(name: str) -> str:
    """Published ids are UUIDs; these are fixed ones."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"oasst-reader-test/{name}"))


def published_message(name, parent, role, text, lang="en", **overrides):
    """One ExportMessageNode with every field of the schema; like the published files, the nested message's
    message_tree_id and tree_state are null (they live on the tree)."""
    message = {
        "message_id": oasst_id(name),
        "parent_id": None if parent is None else oasst_id(parent),
        "user_id": oasst_id(f"user-{name}"),
        "created_date": "2023-04-12T09:41:07.123456+00:00",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": None if role == "prompter" else 0,
        "synthetic": False,
        "model_name": None,
        "detoxify": {"toxicity": 0.00041, "severe_toxicity": 2.1e-05, "obscene": 0.00012, "identity_attack": 9.8e-05,
                     "insult": 0.00023, "threat": 4.1e-05, "sexual_explicit": 3.2e-05},
        "message_tree_id": None,
        "tree_state": None,
        "emojis": {"+1": 2, "_skip_reply": 1},
        "replies": [],
        "labels": {"spam": {"value": 0.0, "count": 3}, "lang_mismatch": {"value": 0.0, "count": 3},
                   "quality": {"value": 0.75, "count": 3}},
        "events": {"emoji": [{"type": "emoji", "user_id": oasst_id(f"fan-{name}"), "emoji": "+1"}]},
    }
    message.update(overrides)
    return message


def published_tree(prompt, tree_state="ready_for_export", name=None):
    tree_id = prompt["message_id"] if prompt is not None else oasst_id(name)
    return {"message_tree_id": tree_id, "tree_state": tree_state, "prompt": prompt, "origin": "https://open-assistant.io"}


def m(name, parent, role, text, *replies, **overrides):
    """A published message with these replies; `replies=None` as a keyword writes the null some files have."""
    return published_message(name, parent, role, text, **{"replies": list(replies), **overrides})


def published_trees():
    """Five conversation trees (branching, up to depth 4, every filter has something to drop), a tree waiting in
    the prompt lottery with only its prompt, and a tree whose prompt is null."""
    return [
        published_tree(m("sort", None, "prompter", "How do I sort a list in Python?",
                         m("sort-a0", "sort", "assistant", "Use sorted(items) for a new list or items.sort() in place.",
                           m("sort-p1", "sort-a0", "prompter", "And in reverse order?",
                             m("sort-a1", "sort-p1", "assistant", "Pass reverse=True to either of them."),
                             m("sort-a2", "sort-p1", "assistant", "Reverse it yourself.", review_result=False, rank=1))),
                         m("sort-a3", "sort", "assistant", "sorted() takes any iterable and a key= function.", rank=1),
                         m("sort-a4", "sort", "assistant", "A deleted answer.", deleted=True, rank=2))),
        published_tree(m("egg", None, "prompter", "How long should I boil an egg?",
                         m("egg-a0", "egg", "assistant", "Nine minutes for a firm yolk, then cool it in cold water.",
                           m("egg-p1", "egg-a0", "prompter", "And a soft one?",
                             m("egg-a1", "egg-p1", "assistant", "Six minutes.",
                               m("egg-p2", "egg-a1", "prompter", "Thanks, that worked!")))),
                         m("egg-a2", "egg", "assistant", "Boil it until it is done.", rank=1, emojis=None, labels=None,
                           detoxify=None, events=None))),
        published_tree(m("save", None, "prompter", "How do I start saving money?",
                         m("save-a0", "save", "assistant", "Track your spending and automate a monthly transfer."),
                         m("save-a1", "save", "assistant", "   ", rank=1),
                         m("save-a2", "save", "assistant", "Set a goal, then pay yourself first.", rank=2))),
        published_tree(m("run", None, "prompter", "How do I start running?",
                         m("run-a0", "run", "assistant", "Mix short runs with walking, three times a week.", replies=None),
                         m("run-a1", "run", "assistant", "Buy shoes that fit, then start slowly.", rank=1))),
        published_tree(m("brot", None, "prompter", "Wie backe ich Brot?",
                         m("brot-a0", "brot", "assistant", "Mehl, Wasser, Salz und Hefe, dann eine Stunde gehen lassen.",
                           lang="de"),
                         m("brot-a1", "brot", "assistant", "Mit Sauerteig dauert es länger.", lang="de", rank=1),
                         lang="de")),
        published_tree(m("lottery", None, "prompter", "Write a haiku about tests.", review_count=0, review_result=None,
                         replies=None),
                       tree_state="prompt_lottery_waiting"),
        published_tree(None, tree_state="aborted_low_grade", name="empty-tree"),
    ]


MESSAGES_PER_TREE = {"sort": 7, "egg": 6, "save": 4, "run": 3, "brot": 3, "lottery": 1}
# Assistant, not deleted, passed (or awaiting) review, non-blank, English.
KEPT_EN = ["sort-a0", "sort-a1", "sort-a3", "egg-a0", "egg-a1", "egg-a2", "save-a0", "save-a2", "run-a0", "run-a1"]


def write_jsonl(path, records, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return path


def flat_export(trees):
    """The flat messages export oasst_data's tree_to_messages writes: depth-first, replies dropped, each message
    given its tree's state (and id)."""
    messages = []
    for tree in trees:
        stack = [tree["prompt"]] if tree["prompt"] is not None else []
        while stack:
            node = stack.pop()
            message = {key: value for key, value in node.items() if key != "replies"}
            message.update(message_tree_id=tree["message_tree_id"], tree_state=tree["tree_state"])
            messages.append(message)
            stack.extend(reversed(node["replies"] or []))
    return messages


@pytest.fixture(scope="module")
def published_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    trees = published_trees()
    return {"trees": write_jsonl(root / "2023-11-05_oasst2_ready.trees.jsonl", trees),
            "trees.gz": write_jsonl(root / "2023-11-05_oasst2_ready.trees.jsonl.gz", trees, compress=True),
            "messages": write_jsonl(root / "2023-11-05_oasst2_ready.messages.jsonl", flat_export(trees))}


@pytest.mark.parametrize("kind", ["trees", "trees.gz"])
def test_a_published_trees_export_puts_every_message_in_its_own_tree(published_files, kind):
    shape, messages, bad_lines = read_local_file(published_files[kind], skip_bad_lines=False)
    assert shape == TREES and bad_lines == []
    trees = {tree["message_tree_id"]: tree for tree in published_trees()}
    per_tree = {name: sum(message["message_tree_id"] == oasst_id(name) for message in messages) for name in MESSAGES_PER_TREE}
    assert per_tree == MESSAGES_PER_TREE and len(messages) == sum(MESSAGES_PER_TREE.values())
    for message in messages:
        # The tree's id and state fill the nulls of its nested messages; a prompt's id is its tree's id.
        assert message["message_tree_id"] in trees and message["tree_state"] == trees[message["message_tree_id"]]["tree_state"]
        assert "replies" not in message
    assert {m["tree_state"] for m in messages if m["message_tree_id"] == oasst_id("lottery")} == {"prompt_lottery_waiting"}
    kept, counts = filter_messages(messages, parse_languages("en"))
    assert [m["message_id"] for m in kept] == [oasst_id(name) for name in KEPT_EN]
    assert counts["read"] == 24 and counts["assistant"] == 15 and counts["non_blank"] == 12


def test_the_same_export_as_flat_messages_gives_the_same_messages(published_files):
    _, from_trees, _ = read_local_file(published_files["trees"], skip_bad_lines=False)
    shape, from_messages, bad_lines = read_local_file(published_files["messages"], skip_bad_lines=False)
    assert shape == FLAT and bad_lines == []
    assert from_messages == from_trees


def test_the_hubs_parquet_with_struct_columns_reads_and_filters(published_files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The hub's parquet stores emojis and labels as structs of lists and has no events.
    rows = []
    for message in flat_export(published_trees()):
        row = {key: value for key, value in message.items() if key != "events"}
        if row["emojis"] is not None:
            row["emojis"] = {"name": list(row["emojis"]), "count": list(row["emojis"].values())}
        if row["labels"] is not None:
            row["labels"] = {"name": list(row["labels"]), "value": [label["value"] for label in row["labels"].values()],
                             "count": [label["count"] for label in row["labels"].values()]}
        rows.append(row)
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    shape, messages, _ = read_local_file(path, skip_bad_lines=False)
    assert shape == FLAT and [m["message_id"] for m in messages] == [row["message_id"] for row in rows]
    kept, _ = filter_messages(messages, parse_languages("en"))
    assert [m["message_id"] for m in kept] == [oasst_id(name) for name in KEPT_EN]


def test_the_split_keeps_whole_published_trees_on_one_side(published_files):
    _, messages, _ = read_local_file(published_files["trees"], skip_bad_lines=False)
    split, tree_split = split_by_tree(messages, 0.3)
    sides = {side: {m["message_tree_id"] for m in split[side]} for side in split}
    assert sides["train"].isdisjoint(sides["validation"])
    assert sides == {side: set(tree_split[side]) for side in tree_split}
    # Six trees hold messages (the lottery tree its prompt): 30% rounds up to two; the null prompt has none.
    assert len(sides["validation"]) == 2 and len(sides["train"]) == 4
    assert len(split["train"]) + len(split["validation"]) == len(messages)


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    """A 300-token byte-level BPE (as conftest's small_vocab_inputs trains one), saved with save_pretrained."""
    from studykit.tiny import train_byte_level_tokenizer

    directory = tmp_path_factory.mktemp("small-tokenizer")
    texts = [m["text"] for m in flat_export(published_trees())]
    train_byte_level_tokenizer(texts, vocab_size=300).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["trees.gz", "messages"])
def test_prepare_reads_a_published_export(published_files, small_tokenizer_dir, tmp_path, kind):
    from studykit.prepare import prepare

    # lang=all: the German tree counts too, so any two held-out trees include one with responses.
    config = PrepareConfig(data_file=str(published_files[kind]), tokenizer=str(small_tokenizer_dir),
                           output_dir=str(tmp_path / "data"), seq_len=32, val_fraction=0.3, lang="all")
    with contextlib.redirect_stdout(io.StringIO()):
        meta = prepare(config)
    counts = meta["counts"]
    assert counts["train"]["read"] + counts["validation"]["read"] == sum(MESSAGES_PER_TREE.values())
    assert counts["train"]["language"] + counts["validation"]["language"] == len(KEPT_EN) + 2
    assert meta["source_shape"] == (TREES if kind.startswith("trees") else FLAT) and meta["bad_lines_skipped"] == []
    tree_split = json.loads((tmp_path / "data" / "tree_split.json").read_text())
    assert len(tree_split["validation"]) == 2 and set(tree_split["train"]).isdisjoint(tree_split["validation"])


# ---------------------------------------------------------------------------------------------------------
# Bad lines in otherwise good files: named by number, skipped on request
# ---------------------------------------------------------------------------------------------------------


def test_a_nested_message_from_another_tree_makes_its_line_corrupt(tmp_path):
    trees = published_trees()
    trees[2]["prompt"]["replies"][1]["message_tree_id"] = oasst_id("egg")
    path = write_jsonl(tmp_path / "mixed-up.trees.jsonl", trees)
    with pytest.raises(UserError) as refusal:
        read_local_file(path, skip_bad_lines=False)
    message = str(refusal.value)
    assert "has 1 corrupt line(s) (line 3); line 3: message " in message
    assert f'has message_tree_id "{oasst_id("egg")}", but its tree is "{oasst_id("save")}"' in message
    shape, messages, bad_lines = read_local_file(path, skip_bad_lines=True)
    # The whole tree goes, not only the message: its other messages would lose their conversation.
    assert shape == TREES and bad_lines == [3]
    assert {m["message_tree_id"] for m in messages} == {oasst_id(name) for name in MESSAGES_PER_TREE if name != "save"}


def test_invalid_utf8_on_line_5_is_a_numbered_corrupt_line(published_files, tmp_path):
    lines = published_files["messages"].read_bytes().splitlines()
    # Latin-1 "é" saved into a UTF-8 file: a lone lead byte.
    lines[4] = lines[4].replace(b'"text": "', b'"text": "caf\xe9 ', 1)
    path = tmp_path / "latin.messages.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=re.escape("has 1 corrupt line(s) (line 5); line 5: not UTF-8 text (byte 0xe9")):
        read_local_file(path, skip_bad_lines=False)
    _, messages, bad_lines = read_local_file(path, skip_bad_lines=True)
    assert bad_lines == [5] and len(messages) == len(lines) - 1


@pytest.mark.parametrize("damage, expected", [
    ("cut short", "is damaged: its gzip data ends early (the file was cut short); download or copy it again"),
    ("bytes flipped", "is damaged: its gzip data is corrupt ("),
    ("not gzip", "is not gzip data although its name ends in .gz; rename it without .gz if it is JSON Lines"),
])
def test_a_damaged_gzip_export_is_refused_in_one_sentence(published_files, tmp_path, damage, expected):
    data = published_files["trees.gz"].read_bytes()
    damaged = {"cut short": data[: len(data) // 2],
               "bytes flipped": data[:40] + bytes(byte ^ 0x55 for byte in data[40:80]) + data[80:],
               "not gzip": published_files["trees"].read_bytes()}[damage]
    path = tmp_path / "download.trees.jsonl.gz"
    path.write_bytes(damaged)
    for skip_bad_lines in (False, True):
        with pytest.raises(UserError) as refusal:
            read_local_file(path, skip_bad_lines)
        assert str(refusal.value).startswith(f"{path} ") and expected in str(refusal.value)
        assert len(str(refusal.value).splitlines()) == 1


def test_parquet_rows_are_named_by_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = flat_export(published_trees())[:6]
    rows[1]["role"], rows[4]["deleted"] = None, None
    rows[4]["message_id"] = ""
    path = tmp_path / "messages.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=re.escape("has 2 corrupt row(s) (row 2, 5); row 2: role must be a string, not null")):
        read_local_file(path, skip_bad_lines=False)
    assert read_local_file(path, skip_bad_lines=True)[2] == [2, 5]


def test_a_file_mixing_both_shapes_names_the_first_stray_line(published_files, tmp_path):
    lines = published_files["trees"].read_text().splitlines()
    flat = [json.dumps(message) for message in flat_export(published_trees())[:2]]
    path = tmp_path / "concatenated.jsonl"
    path.write_text("\n".join(lines[:3] + flat + lines[3:]) + "\n")
    for skip_bad_lines in (False, True):
        with pytest.raises(UserError, match=re.escape("mixes flat messages and message trees (7 line(s) of message trees, "
                                                      "2 of flat messages, the first on line 4)")):
            read_local_file(path, skip_bad_lines)


def test_trees_without_any_message_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "empty.trees.jsonl", [published_tree(None, name=f"empty-{n}") for n in range(3)])
    with pytest.raises(UserError, match=re.escape("holds 3 message tree(s) but no messages (every prompt is null)")):
        read_local_file(path, skip_bad_lines=False)
