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
import os
import re
import tempfile
import uuid

import pytest

# Hypothesis keeps caches in ./.hypothesis unless told otherwise, which would put files into the checkout; it reads
# this variable when it first writes one, which is after this module is imported.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "studykit-hypothesis"))
from conftest import PREPARE, refused
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from studykit.config import PrepareConfig
from studykit.errors import UserError
from studykit.oasst import (
    FLAT,
    TREES,
    filter_messages,
    opening_prompts,
    parse_languages,
    read_local_file,
    split_by_tree,
)

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
        "detoxify": {
            "toxicity": 0.00041,
            "severe_toxicity": 2.1e-05,
            "obscene": 0.00012,
            "identity_attack": 9.8e-05,
            "insult": 0.00023,
            "threat": 4.1e-05,
            "sexual_explicit": 3.2e-05,
        },
        "message_tree_id": None,
        "tree_state": None,
        "emojis": {"+1": 2, "_skip_reply": 1},
        "replies": [],
        "labels": {
            "spam": {"value": 0.0, "count": 3},
            "lang_mismatch": {"value": 0.0, "count": 3},
            "quality": {"value": 0.75, "count": 3},
        },
        "events": {"emoji": [{"type": "emoji", "user_id": oasst_id(f"fan-{name}"), "emoji": "+1"}]},
    }
    message.update(overrides)
    return message


def published_tree(prompt, tree_state="ready_for_export", name=None):
    tree_id = prompt["message_id"] if prompt is not None else oasst_id(name)
    return {
        "message_tree_id": tree_id,
        "tree_state": tree_state,
        "prompt": prompt,
        "origin": "https://open-assistant.io",
    }


def m(name, parent, role, text, *replies, **overrides):
    """A published message with these replies; `replies=None` as a keyword writes the null some files have."""
    return published_message(name, parent, role, text, **{"replies": list(replies), **overrides})


def published_trees():
    """Five conversation trees (branching, up to depth 4, every filter has something to drop), a tree waiting in
    the prompt lottery with only its prompt, and a tree whose prompt is null."""
    return [
        published_tree(
            m(
                "sort",
                None,
                "prompter",
                "How do I sort a list in Python?",
                m(
                    "sort-a0",
                    "sort",
                    "assistant",
                    "Use sorted(items) for a new list or items.sort() in place.",
                    m(
                        "sort-p1",
                        "sort-a0",
                        "prompter",
                        "And in reverse order?",
                        m("sort-a1", "sort-p1", "assistant", "Pass reverse=True to either of them."),
                        m("sort-a2", "sort-p1", "assistant", "Reverse it yourself.", review_result=False, rank=1),
                    ),
                ),
                m("sort-a3", "sort", "assistant", "sorted() takes any iterable and a key= function.", rank=1),
                m("sort-a4", "sort", "assistant", "A deleted answer.", deleted=True, rank=2),
            )
        ),
        published_tree(
            m(
                "egg",
                None,
                "prompter",
                "How long should I boil an egg?",
                m(
                    "egg-a0",
                    "egg",
                    "assistant",
                    "Nine minutes for a firm yolk, then cool it in cold water.",
                    m(
                        "egg-p1",
                        "egg-a0",
                        "prompter",
                        "And a soft one?",
                        m(
                            "egg-a1",
                            "egg-p1",
                            "assistant",
                            "Six minutes.",
                            m("egg-p2", "egg-a1", "prompter", "Thanks, that worked!"),
                        ),
                    ),
                ),
                m(
                    "egg-a2",
                    "egg",
                    "assistant",
                    "Boil it until it is done.",
                    rank=1,
                    emojis=None,
                    labels=None,
                    detoxify=None,
                    events=None,
                ),
            )
        ),
        published_tree(
            m(
                "save",
                None,
                "prompter",
                "How do I start saving money?",
                m("save-a0", "save", "assistant", "Track your spending and automate a monthly transfer."),
                m("save-a1", "save", "assistant", "   ", rank=1),
                m("save-a2", "save", "assistant", "Set a goal, then pay yourself first.", rank=2),
            )
        ),
        published_tree(
            m(
                "run",
                None,
                "prompter",
                "How do I start running?",
                m("run-a0", "run", "assistant", "Mix short runs with walking, three times a week.", replies=None),
                m("run-a1", "run", "assistant", "Buy shoes that fit, then start slowly.", rank=1),
            )
        ),
        published_tree(
            m(
                "brot",
                None,
                "prompter",
                "Wie backe ich Brot?",
                m("brot-a0", "brot", "assistant", "Mehl, Wasser, Salz, Hefe, dann gehen lassen.", lang="de"),
                m("brot-a1", "brot", "assistant", "Mit Sauerteig dauert es länger.", lang="de", rank=1),
                lang="de",
            )
        ),
        published_tree(
            m(
                "lottery",
                None,
                "prompter",
                "Write a haiku about tests.",
                review_count=0,
                review_result=None,
                replies=None,
            ),
            tree_state="prompt_lottery_waiting",
        ),
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
    return {
        "trees": write_jsonl(root / "2023-11-05_oasst2_ready.trees.jsonl", trees),
        "trees.gz": write_jsonl(root / "2023-11-05_oasst2_ready.trees.jsonl.gz", trees, compress=True),
        "messages": write_jsonl(root / "2023-11-05_oasst2_ready.messages.jsonl", flat_export(trees)),
    }


@pytest.mark.parametrize("kind", ["trees", "trees.gz"])
def test_a_published_trees_export_puts_every_message_in_its_own_tree(published_files, kind):
    shape, messages, bad_lines = read_local_file(published_files[kind], skip_bad_lines=False)
    assert shape == TREES and bad_lines == []
    trees = {tree["message_tree_id"]: tree for tree in published_trees()}
    per_tree = {name: sum(m["message_tree_id"] == oasst_id(name) for m in messages) for name in MESSAGES_PER_TREE}
    assert per_tree == MESSAGES_PER_TREE and len(messages) == sum(MESSAGES_PER_TREE.values())
    for message in messages:
        # The tree's id and state fill the nulls of its nested messages; a prompt's id is its tree's id.
        tree = trees[message["message_tree_id"]]
        assert message["tree_state"] == tree["tree_state"]
        assert "replies" not in message
    lottery_states = {m["tree_state"] for m in messages if m["message_tree_id"] == oasst_id("lottery")}
    assert lottery_states == {"prompt_lottery_waiting"}
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
            row["labels"] = {
                "name": list(row["labels"]),
                "value": [label["value"] for label in row["labels"].values()],
                "count": [label["count"] for label in row["labels"].values()],
            }
        rows.append(row)
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    shape, messages, _ = read_local_file(path, skip_bad_lines=False)
    assert shape == FLAT and [m["message_id"] for m in messages] == [row["message_id"] for row in rows]
    kept, _ = filter_messages(messages, parse_languages("en"))
    assert [m["message_id"] for m in kept] == [oasst_id(name) for name in KEPT_EN]


def test_the_split_keeps_whole_published_trees_on_one_side(published_files):
    _, messages, _ = read_local_file(published_files["trees"], skip_bad_lines=False)
    kept, held_out, kept_trees, held_out_trees = split_by_tree(messages, 0.3, "the test split")
    assert {m["message_tree_id"] for m in kept} == set(kept_trees) and {m["message_tree_id"] for m in held_out} == set(
        held_out_trees
    )
    assert set(kept_trees).isdisjoint(held_out_trees)
    # Six trees hold messages (the lottery tree its prompt): 30% rounds up to two; the null prompt has none.
    assert len(held_out_trees) == 2 and len(kept_trees) == 4
    assert len(kept) + len(held_out) == len(messages)


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
    config = PrepareConfig(
        data_file=str(published_files[kind]),
        tokenizer=str(small_tokenizer_dir),
        output_dir=str(tmp_path / "data"),
        seq_len=32,
        test_fraction=0.3,
        lang="all",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        meta = prepare(config)
    counts = meta["counts"]
    assert sum(counts[split]["read"] for split in ("train", "dev", "test")) == sum(MESSAGES_PER_TREE.values())
    assert sum(counts[split]["language"] for split in ("train", "dev", "test")) == len(KEPT_EN) + 2
    assert meta["source_shape"] == (TREES if kind.startswith("trees") else FLAT) and meta["bad_lines_skipped"] == []
    tree_split = json.loads((tmp_path / "data" / "tree_split.json").read_text())
    # Two of the six trees with messages are test trees; the dev split takes one of the other four.
    assert len(tree_split["test"]) == 2 and len(tree_split["dev"]) == 1 and len(tree_split["train"]) == 3
    assert not set(tree_split["train"]) & set(tree_split["dev"]) | set(tree_split["train"]) & set(tree_split["test"])


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


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("cut short", "is damaged: its gzip data ends early (the file was cut short); download or copy it again"),
        ("bytes flipped", "is damaged: its gzip data is corrupt ("),
        ("not gzip", "is not gzip data although its name ends in .gz; rename it without .gz if it is JSON Lines"),
    ],
)
def test_a_damaged_gzip_export_is_refused_in_one_sentence(published_files, tmp_path, damage, expected):
    data = published_files["trees.gz"].read_bytes()
    damaged = {
        "cut short": data[: len(data) // 2],
        "bytes flipped": data[:40] + bytes(byte ^ 0x55 for byte in data[40:80]) + data[80:],
        "not gzip": published_files["trees"].read_bytes(),
    }[damage]
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
    expected = "has 2 corrupt row(s) (row 2, 5); row 2: role must be a string, not null"
    with pytest.raises(UserError, match=re.escape(expected)):
        read_local_file(path, skip_bad_lines=False)
    assert read_local_file(path, skip_bad_lines=True)[2] == [2, 5]


def test_a_file_mixing_both_shapes_names_the_first_stray_line(published_files, tmp_path):
    lines = published_files["trees"].read_text().splitlines()
    flat = [json.dumps(message) for message in flat_export(published_trees())[:2]]
    path = tmp_path / "concatenated.jsonl"
    path.write_text("\n".join(lines[:3] + flat + lines[3:]) + "\n")
    for skip_bad_lines in (False, True):
        expected = (
            "mixes flat messages and message trees (7 line(s) of message trees, 2 of flat messages, the first "
            "on line 4)"
        )
        with pytest.raises(UserError, match=re.escape(expected)):
            read_local_file(path, skip_bad_lines)


def test_trees_without_any_message_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "empty.trees.jsonl", [published_tree(None, name=f"empty-{n}") for n in range(3)])
    with pytest.raises(UserError, match=re.escape("holds 3 message tree(s) but no messages (every prompt is null)")):
        read_local_file(path, skip_bad_lines=False)


# ---------------------------------------------------------------------------------------------------------
# Properties: whatever a file holds, it is read or refused in one line, never with a traceback
# ---------------------------------------------------------------------------------------------------------

FILE_LEVEL_REFUSALS = (
    "holds no records",
    "holds one JSON array",
    "but no messages (every prompt is null)",
    "is damaged",
    "is not gzip data",
)
# No example database: the tests write nothing into the checkout, and every run draws the same kind of files.
PROPERTY_SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def read_or_refused(path, skip_bad_lines, unit="line"):
    """read_local_file's promise: messages the rest of the pipeline can use, or a UserError in one line that names
    the line numbers it is about. Any other exception fails the test."""
    try:
        shape, messages, bad_lines = read_local_file(path, skip_bad_lines)
    except UserError as error:
        message = str(error)
        assert message.splitlines() == [message], message
        assert re.search(rf"\b{unit} \d+", message) or any(phrase in message for phrase in FILE_LEVEL_REFUSALS), message
        event(f"refused: {refusal_kind(message)}")
        return None
    assert shape in (FLAT, TREES) and messages
    assert bad_lines == sorted(set(bad_lines)) and (skip_bad_lines or not bad_lines)
    for message in messages:
        assert isinstance(message["message_id"], str) and message["message_id"]
        assert isinstance(message["message_tree_id"], str) and message["message_tree_id"]
        assert isinstance(message["role"], str) and (message["text"] is None or isinstance(message["text"], str))
        (message["text"] or "").encode("utf-8")
    filter_messages(messages, None)
    filter_messages(messages, parse_languages("en,de"))
    opening_prompts(messages, None, 8)
    if len({message["message_tree_id"] for message in messages}) >= 2:
        kept, held_out, _, _ = split_by_tree(messages, 0.2, "the test split")
        assert {m["message_tree_id"] for m in kept}.isdisjoint(m["message_tree_id"] for m in held_out)
    event(f"read {shape}" + (" skipping lines" if bad_lines else ""))
    return shape, messages, bad_lines


def refusal_kind(message):
    kinds = ["corrupt", "not an OASST export", "mixes", *FILE_LEVEL_REFUSALS]
    return next((kind for kind in kinds if kind in message), message)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One directory for every example of a property (tmp_path would be shared across examples anyway)."""
    return tmp_path_factory.mktemp("property")


def small_message(index, tree, parent=None, role="assistant"):
    return {
        "message_id": f"m{index}",
        "parent_id": parent,
        "message_tree_id": tree,
        "role": role,
        "text": f"text {index}",
        "lang": "en",
        "deleted": False,
        "review_result": True,
    }


GOOD_FLAT_LINES = [json.dumps(small_message(i, f"t{i % 3}")).encode() for i in range(4)]
GOOD_TREE_LINES = [
    json.dumps(
        {
            "message_tree_id": f"t{i}",
            "tree_state": None,
            "prompt": {
                **small_message(f"{i}p", None, role="prompter"),
                "replies": [{**small_message(f"{i}a", None, f"m{i}p"), "replies": []}],
            },
        }
    ).encode()
    for i in range(3)
]
# Bytes a file can hold that a JSON parser or a UTF-8 decoder refuses, or that Python's json reads into surprises.
AWKWARD_LINES = [
    b"\xff\xfe",
    b"\x00",
    b"\xef\xbb\xbf{}",
    b"\xed\xa0\x80",
    b"\r",
    b"[",
    b"]",
    b"{",
    b"null",
    b"NaN",
    b'"\\ud800"',
    b'{"message_id": "\\udfff", "message_tree_id": "t", "role": "assistant", "text": "x"}',
    b'{"message_id": "m", "message_tree_id": "t", "role": "assistant", "text": "\\ud83d"}',
    b'{"message_id": NaN, "message_tree_id": Infinity, "role": -Infinity, "text": null}',
    b"1" * 5000,
    b"[" * 3000 + b"]" * 3000,
    b'{"prompt": ' * 2000,
    b'{"a": 1}',
    b'{"message_tree_id": "t9", "prompt": null}',
    b'{"message_tree_id": "t9", "prompt": {"replies": "x"}}',
]
any_byte_line = st.binary(max_size=60).map(lambda line: line.replace(b"\n", b""))


@st.composite
def byte_files(draw):
    good = draw(st.sampled_from([GOOD_FLAT_LINES, GOOD_TREE_LINES, GOOD_FLAT_LINES + GOOD_TREE_LINES]))
    line = st.one_of(any_byte_line, st.sampled_from(AWKWARD_LINES), st.sampled_from(good))
    lines = draw(st.lists(line, max_size=10))
    bom = draw(st.booleans())
    return (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


@settings(max_examples=250, **PROPERTY_SETTINGS)
@given(content=byte_files(), compress=st.booleans(), skip_bad_lines=st.booleans())
def test_any_bytes_are_read_or_refused_by_line_number(scratch, content, compress, skip_bad_lines):
    path = scratch / ("bytes.jsonl.gz" if compress else "bytes.jsonl")
    path.write_bytes(gzip.compress(content) if compress else content)
    read_or_refused(path, skip_bad_lines)


FIELD_NAMES = [
    "message_id",
    "message_tree_id",
    "parent_id",
    "role",
    "text",
    "lang",
    "deleted",
    "review_result",
    "replies",
    "prompt",
    "tree_state",
    "labels",
    "emojis",
]
# Every character, lone surrogates included: json.dumps writes them as "\ud800", which json.loads reads back.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(),
    any_text,
    st.sampled_from(["", "en", "assistant", "prompter", "t1", "m1", "\ud800"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES) | any_text, children, max_size=4)
    ),
    max_leaves=12,
)


def field_or_anything(good):
    # Mostly a value of the right type, so that whole records are often valid and files are often read.
    return st.sampled_from(["good"] * 5 + ["anything"]).flatmap(lambda pick: good if pick == "good" else json_values)


message_base = st.fixed_dictionaries(
    {
        "message_id": field_or_anything(st.sampled_from(["m1", "m2", "m3"])),
        "role": field_or_anything(st.sampled_from(["assistant", "prompter"])),
        "text": field_or_anything(st.text(max_size=20)),
    },
    optional={
        "message_tree_id": field_or_anything(st.sampled_from(["t1", "t2"]) | st.none()),
        "parent_id": field_or_anything(st.none() | st.just("m1")),
        "lang": field_or_anything(st.sampled_from(["en", "de"])),
        "deleted": field_or_anything(st.booleans()),
        "review_result": field_or_anything(st.booleans()),
    },
)
nested_messages = st.recursive(
    message_base,
    lambda children: st.builds(
        lambda message, replies: {**message, "replies": replies},
        message_base,
        st.lists(children, max_size=3) | json_values,
    ),
    max_leaves=6,
)
tree_records = st.fixed_dictionaries(
    {
        "message_tree_id": field_or_anything(st.sampled_from(["t1", "t2", "t3"])),
        "prompt": st.none() | nested_messages | json_values,
    },
    optional={"tree_state": json_values, "origin": json_values},
)


@settings(max_examples=250, **PROPERTY_SETTINGS)
@given(
    records=st.one_of(
        st.lists(st.one_of(json_values, message_base, tree_records), min_size=1, max_size=6),
        st.lists(message_base, min_size=1, max_size=6),
        st.lists(tree_records, min_size=1, max_size=6),
    ),
    skip_bad_lines=st.booleans(),
)
def test_any_json_values_are_read_or_refused_by_line_number(scratch, records, skip_bad_lines):
    path = scratch / "values.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="ascii")
    read_or_refused(path, skip_bad_lines)


DELETE = object()
# (field, value) changes to one message. HARMFUL ones break a rule of the reader (the line must be named);
# HARMLESS ones touch fields the kit does not read or use a null the schema allows (the line must be read).
HARMFUL_ANYWHERE = [
    ("message_id", DELETE),
    ("message_id", None),
    ("message_id", 5),
    ("message_id", True),
    ("message_id", ""),
    ("message_id", ["m"]),
    ("message_id", "\ud800"),
    ("role", DELETE),
    ("role", None),
    ("role", 5),
    ("role", ["assistant"]),
    ("text", DELETE),
    ("text", 5),
    ("text", ["hi"]),
    ("text", {"t": 1}),
    ("text", "caf\udce9"),
    ("parent_id", 3),
    ("parent_id", {}),
    ("lang", {"en": 1}),
    ("lang", 5),
    ("deleted", "yes"),
    ("deleted", 1),
    ("review_result", "no"),
    ("review_result", 0),
    ("replies", "x"),
    ("replies", {}),
    ("message_tree_id", 5),
    ("message_tree_id", ["t"]),
]
HARMFUL_NESTED = [("replies", [1]), ("replies", ["x"]), ("replies", [None]), ("message_tree_id", "another-tree")]
HARMFUL_FLAT = [("message_tree_id", DELETE), ("message_tree_id", None), ("message_tree_id", "")]
HARMLESS_ANYWHERE = [
    ("labels", "x"),
    ("emojis", None),
    ("detoxify", [1, 2]),
    ("events", 5),
    ("user_id", 5),
    ("rank", "first"),
    ("created_date", None),
    ("surprise", {"a": [1]}),
    ("text", None),
    ("lang", None),
    ("deleted", None),
    ("review_result", None),
    ("parent_id", None),
    ("review_count", "3"),
    ("synthetic", "no"),
    ("model_name", 7),
    ("tree_state", 5),
]
HARMLESS_NESTED = [("message_tree_id", None), ("message_tree_id", DELETE), ("replies", None), ("replies", DELETE)]
HARMFUL_TREE = [
    ("message_tree_id", DELETE),
    ("message_tree_id", None),
    ("message_tree_id", 5),
    ("message_tree_id", ""),
    ("message_tree_id", "\udfff"),
    ("prompt", DELETE),
    ("prompt", "x"),
    ("prompt", 5),
    ("prompt", []),
    ("prompt", True),
]
HARMLESS_TREE = [("tree_state", None), ("tree_state", 5), ("origin", 5), ("surprise", []), ("prompt", None)]


def changed(record, field, value):
    if value is DELETE:
        record.pop(field, None)
    else:
        record[field] = value


def tree_nodes(tree):
    """Every message of a generated tree, prompt first (the trees here always have list replies)."""
    nodes, stack = [], [tree["prompt"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(reversed(node["replies"]))
    return nodes


def message_ids_of(record, shape):
    """The messages a harmlessly changed line still holds, in the reader's depth-first order."""
    if shape == FLAT:
        return [record["message_id"]]
    ids, stack = [], [] if record["prompt"] is None else [record["prompt"]]
    while stack:
        node = stack.pop()
        ids.append(node["message_id"])
        stack.extend(reversed(node.get("replies") or []))
    return ids


@st.composite
def mutated_lines(draw, number, shape, outcomes=("unchanged", "harmful", "harmless")):
    """One valid flat message or tree for line `number`, then at most one change. Returns (record, harmful)."""
    if shape == FLAT:
        record = small_message(
            f"{number}", f"t{draw(st.integers(0, 3))}", role=draw(st.sampled_from(["assistant", "prompter"]))
        )
        targets = [(record, HARMFUL_ANYWHERE + HARMFUL_FLAT, HARMLESS_ANYWHERE)]
    else:
        parents = [None] + [draw(st.integers(0, index - 1)) for index in range(1, draw(st.integers(1, 6)))]
        nodes = []
        for index, parent in enumerate(parents):
            node = {
                **small_message(
                    f"{number}-{index}",
                    None,
                    None if parent is None else nodes[parent]["message_id"],
                    role="prompter" if index == 0 else "assistant",
                ),
                "replies": [],
            }
            nodes.append(node)
            if parent is not None:
                nodes[parent]["replies"].append(node)
        record = {
            "message_tree_id": f"tree-{number}",
            "tree_state": "ready_for_export",
            "prompt": nodes[0],
            "origin": None,
        }
        targets = [(record, HARMFUL_TREE, HARMLESS_TREE)] + [
            (node, HARMFUL_ANYWHERE + HARMFUL_NESTED, HARMLESS_ANYWHERE + HARMLESS_NESTED)
            for node in tree_nodes(record)
        ]
    outcome = draw(st.sampled_from(outcomes))
    if outcome != "unchanged":
        target, harmful, harmless = draw(st.sampled_from(targets))
        field, value = draw(st.sampled_from(harmful if outcome == "harmful" else harmless))
        changed(target, field, value if value is DELETE else copy.deepcopy(value))
    return record, outcome == "harmful"


@st.composite
def mutated_files(draw, must_be_refused=False):
    kind = draw(st.sampled_from([FLAT, TREES, "mixed"]))
    shapes = [kind if kind != "mixed" else draw(st.sampled_from([FLAT, TREES])) for _ in range(draw(st.integers(1, 8)))]
    lines = [draw(mutated_lines(number, shape)) + (shape,) for number, shape in enumerate(shapes, start=1)]
    if must_be_refused and not any(harmful for _, harmful, _ in lines):
        record, _ = draw(mutated_lines(len(lines) + 1, shapes[0], outcomes=("harmful",)))
        lines.append((record, True, shapes[0]))
    return lines


def expected_refusal(lines, skip_bad_lines):
    """What the reader must say about these lines, or None when it must read them."""
    valid = {
        shape: [
            number
            for number, (_, harmful, line_shape) in enumerate(lines, start=1)
            if not harmful and line_shape == shape
        ]
        for shape in (FLAT, TREES)
    }
    corrupt = [number for number, (_, harmful, _) in enumerate(lines, start=1) if harmful]
    if not valid[FLAT] and not valid[TREES]:
        return "is not an OASST export: no line holds a valid message", "; line 1: "
    if valid[FLAT] and valid[TREES]:
        major, minor = sorted((FLAT, TREES), key=lambda shape: (-len(valid[shape]), valid[shape][0]))
        return (
            f"mixes flat messages and message trees ({len(valid[major])} line(s) of {major}",
            f"the first on line {valid[minor][0]})",
        )
    if corrupt and not skip_bad_lines:
        numbers = ", ".join(map(str, corrupt))
        return f"has {len(corrupt)} corrupt line(s) (line {numbers}); line {corrupt[0]}: ", "--skip-bad-lines"
    shape = FLAT if valid[FLAT] else TREES
    if not any(message_ids_of(lines[number - 1][0], shape) for number in valid[shape]):
        return "but no messages (every prompt is null)", ""
    return None


@settings(max_examples=300, **PROPERTY_SETTINGS)
@given(lines=mutated_files(), skip_bad_lines=st.booleans())
def test_changed_fields_are_named_or_read_exactly_as_the_rules_say(scratch, lines, skip_bad_lines):
    path = scratch / "mutated.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, _, _ in lines), encoding="ascii")
    expected = expected_refusal(lines, skip_bad_lines)
    if expected is not None:
        with pytest.raises(UserError) as refusal:
            read_local_file(path, skip_bad_lines)
        assert all(part in str(refusal.value) for part in expected), (str(refusal.value), expected)
        read_or_refused(path, skip_bad_lines)
        return
    shape, messages, bad_lines = read_or_refused(path, skip_bad_lines)
    good = [(number, record) for number, (record, harmful, _) in enumerate(lines, start=1) if not harmful]
    assert shape == lines[good[0][0] - 1][2]
    assert bad_lines == [number for number, (_, harmful, _) in enumerate(lines, start=1) if harmful]
    assert [m["message_id"] for m in messages] == [id_ for _, record in good for id_ in message_ids_of(record, shape)]
    if shape == TREES:
        tree_of = {id_: record["message_tree_id"] for _, record in good for id_ in message_ids_of(record, shape)}
        assert all(m["message_tree_id"] == tree_of[m["message_id"]] for m in messages)


# in_process is a function-scoped fixture: every example runs the command afresh, which is what it is for.
@settings(
    max_examples=6,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=mutated_files(must_be_refused=True))
def test_the_prepare_command_refuses_a_bad_file_with_exit_2_and_one_error_line(
    in_process, tmp_path_factory, small_tokenizer_dir, lines
):
    root = tmp_path_factory.mktemp("command")
    data_file = root / "export.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record, _, _ in lines), encoding="ascii")
    message = refused(
        PREPARE,
        "--data-file",
        data_file,
        "--tokenizer",
        small_tokenizer_dir,
        "--output-dir",
        root / "out",
        "--seq-len",
        "32",
        watch=[root],
        runner=in_process,
    )
    assert message.startswith(f"error: {data_file} ") and re.search(r"\bline \d+", message), message
