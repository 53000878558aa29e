"""Stage 1: reading both OASST shapes, the filters, the tree split, EOS and truncation."""

import gzip
import json
import shutil

import pytest
from conftest import PREPARE, oasst_message, refused, run_script, snapshot

from studykit.config import PrepareConfig
from studykit.data import load_processed, tokenize_responses
from studykit.errors import UserError
from studykit.oasst import (
    FLAT,
    TREES,
    filter_messages,
    parse_languages,
    read_local_file,
    split_by_tree,
)
from studykit.prepare import prepare


def filter_fixture():
    """Ten messages with a known fate under the default filters (lang=en)."""
    return [
        oasst_message("p1", "t1", None, "prompter", "question"),  # not assistant
        oasst_message("a1", "t1", "p1", "assistant", "kept one"),  # kept
        oasst_message("a1", "t1", "p1", "assistant", "kept one"),  # duplicate id
        oasst_message("a2", "t1", "p1", "assistant", "gone", deleted=True),  # deleted
        oasst_message("a3", "t1", "p1", "assistant", "rejected", review_result=False),  # failed review
        oasst_message("a4", "t2", None, "assistant", "no review yet", review_result=None),  # kept: None is not False
        oasst_message("a5", "t2", None, "assistant", "   \n"),  # blank
        oasst_message("a6", "t2", None, "assistant", "hallo", lang="de"),  # other language
        oasst_message("a7", "t3", None, "assistant", "kept three"),  # kept
        oasst_message("a7", "t3", None, "assistant", "kept three again"),  # duplicate id
    ]


def test_filters_and_dedupe_count_every_stage():
    kept, counts = filter_messages(filter_fixture(), parse_languages("en"))
    assert [m["message_id"] for m in kept] == ["a1", "a4", "a7"]
    assert dict(counts) == {
        "read": 10,
        "unique": 8,
        "assistant": 7,
        "not_deleted": 6,
        "review_passed": 5,
        "non_blank": 4,
        "language": 3,
    }


def test_lang_all_and_lists():
    kept_all, _ = filter_messages(filter_fixture(), parse_languages("all"))
    assert [m["message_id"] for m in kept_all] == ["a1", "a4", "a6", "a7"]
    kept_de, _ = filter_messages(filter_fixture(), parse_languages("de, fr"))
    assert [m["message_id"] for m in kept_de] == ["a6"]


def write_flat(path, messages, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as stream:
        for message in messages:
            stream.write(json.dumps(message) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet"])
def test_flat_shapes_are_detected(tmp_path, suffix):
    messages = filter_fixture()
    path = tmp_path / f"messages{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(messages), path)
    else:
        write_flat(path, messages, compress=suffix.endswith(".gz"))
    shape, read, bad = read_local_file(path, skip_bad_lines=False)
    assert shape == FLAT and bad == []
    assert [m["message_id"] for m in read] == [m["message_id"] for m in messages]


def test_tree_shape_flattens_every_message(oasst_trees_file):
    shape, messages, _ = read_local_file(oasst_trees_file, skip_bad_lines=False)
    assert shape == TREES
    # 24 trees x (prompt + 3 replies + 1 deleted reply)
    assert len(messages) == 24 * 5
    assert all(m["message_tree_id"] == m["message_id"].split("-q")[0].split("-a")[0].split("-del")[0] for m in messages)


def test_tree_split_never_leaks_and_is_deterministic():
    messages = [oasst_message(f"m{t}-{i}", f"tree{t}", None, "assistant", "x") for t in range(40) for i in range(3)]
    kept, held_out, kept_trees, held_out_trees = split_by_tree(messages, 0.1, "the test split")
    assert {m["message_tree_id"] for m in kept}.isdisjoint(m["message_tree_id"] for m in held_out)
    assert len(held_out_trees) == 4 and len(kept_trees) == 36 and len(kept) + len(held_out) == len(messages)
    assert set(held_out_trees) == {m["message_tree_id"] for m in held_out}
    # The split does not depend on file order.
    assert split_by_tree(list(reversed(messages)), 0.1, "the test split")[3] == held_out_trees


@pytest.mark.parametrize("source", ["local file", "hub"])
def test_three_splits_share_no_tree(source, monkeypatch, tmp_path):
    """Test: a local file's held-out trees, or the hub's validation split; dev: carved from the training trees."""
    from studykit import oasst

    messages = [oasst_message(f"m{t}-{i}", f"tree{t}", None, "assistant", "x") for t in range(60) for i in range(3)]
    if source == "hub":
        hub = {"train": messages[:150], "validation": messages[150:]}
        monkeypatch.setattr(oasst, "load_hub_splits", lambda name: hub)
        loaded = oasst.load_source(None, "OpenAssistant/oasst1", 0.05, 0.1, False)
        assert loaded.messages_by_split["test"] == hub["validation"]
    else:
        loaded = oasst.load_source(str(write_flat(tmp_path / "m.jsonl", messages)), "unused", 0.1, 0.1, False)
    trees = loaded.tree_split
    assert set(trees) == {"train", "dev", "test"} and all(trees.values())
    assert all(set(trees[a]).isdisjoint(trees[b]) for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")))
    for split, split_messages in loaded.messages_by_split.items():
        assert {m["message_tree_id"] for m in split_messages} == set(trees[split])
    assert sum(len(split_messages) for split_messages in loaded.messages_by_split.values()) == len(messages)
    # A tenth of the training trees (rounded up) make the dev split.
    training_trees = len(trees["train"]) + len(trees["dev"])
    assert len(trees["dev"]) == -(-training_trees // 10)


def test_eos_appended_and_truncation(gpt2_tokenizer):
    short, long = "Hello there.", "word " * 100
    sequences, truncated = tokenize_responses([short, long], gpt2_tokenizer, seq_len=16)
    assert sequences[0] == gpt2_tokenizer(short)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    assert len(sequences[1]) == 16 and sequences[1] == gpt2_tokenizer(long)["input_ids"][:16]
    assert truncated == 1


def test_prepare_writes_dataset_and_meta(processed_dir, oasst_trees_file):
    data = load_processed(processed_dir)
    meta = data.meta
    assert meta["source_shape"] == TREES and meta["seq_len"] == 64 and meta["lang"] == "en"
    assert sum(meta["counts"][split]["read"] for split in ("train", "dev", "test")) == 24 * 5
    assert sum(meta["counts"][split]["language"] for split in ("train", "dev", "test")) == 24 * 3
    assert meta["sequences"] == {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)}
    assert set(data.train.column_names) == {"input_ids", "prompt_length", "message_id", "message_tree_id"}
    assert set(data.train["prompt_length"]) == {0}  # --context none: responses alone
    splits = {"train": data.train, "dev": data.dev, "test": data.test}
    trees = {name: set(split["message_tree_id"]) for name, split in splits.items()}
    assert (
        trees["train"].isdisjoint(trees["dev"])
        and trees["train"].isdisjoint(trees["test"])
        and trees["dev"].isdisjoint(trees["test"])
    )
    assert json.loads((processed_dir / "tree_split.json").read_text()) == {
        name: sorted(ids) for name, ids in trees.items()
    }
    assert all(ids[-1] == meta["eos_token_id"] for ids in data.train["input_ids"])
    assert meta["tokens"]["train"] == sum(len(ids) for ids in data.train["input_ids"])
    assert (processed_dir / "prepare_config.json").exists() and (processed_dir / "tree_split.json").exists()


def test_seq_len_above_context_is_refused(tmp_path, gpt2_tokenizer_dir, oasst_trees_file):
    config = PrepareConfig(
        data_file=str(oasst_trees_file),
        tokenizer=str(gpt2_tokenizer_dir),
        output_dir=str(tmp_path / "out"),
        seq_len=2048,
    )
    with pytest.raises(UserError, match="exceeds the context"):
        prepare(config)
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_fails_fast_with_the_local_flag(tmp_path):
    result = run_script(
        "data/prepare_oasst.py",
        "--output-dir",
        tmp_path / "out",
        check=False,
        timeout=60,
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--tokenizer PATH" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Mistakes in --output-dir and --data-file: one sentence, exit 2, nothing created or changed.
# ---------------------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"


def prepare_args(data_file, tokenizer, output_dir, *extra):
    return [
        "--data-file",
        data_file,
        "--tokenizer",
        tokenizer,
        "--output-dir",
        output_dir,
        "--seq-len",
        "64",
        "--test-fraction",
        "0.2",
        *extra,
    ]


def test_a_model_directory_is_never_replaced_by_the_dataset(in_process, tmp_path, tiny_model_dir, oasst_trees_file):
    # The audit's case: the model directory as both tokenizer and output; the dataset's rename used to delete it.
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    message = refused(PREPARE, *prepare_args(oasst_trees_file, model, model), watch=[tmp_path], runner=in_process)
    assert f"{model} is not empty and holds no prepared dataset (config.json" in message
    assert message.endswith("choose an empty or new --output-dir.")


def test_a_dataset_from_the_same_inputs_is_kept_and_one_from_other_inputs_needs_overwrite(
    in_process, tmp_path, oasst_trees_file, gpt2_tokenizer_dir
):
    """Prepare agrees with training: the same inputs leave the dataset as it is ("up to date"); other inputs are refused
    unless --overwrite, which replaces the dataset in place."""
    output = tmp_path / "data"
    assert in_process(PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output)).returncode == 0
    first = snapshot(output)

    again = in_process(PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output))
    assert again.returncode == 0 and "up to date" in again.stdout and "nothing rewritten" in again.stdout
    assert snapshot(output) == first, "a dataset prepared from the same inputs was rewritten"

    message = refused(
        PREPARE,
        *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output, "--seq-len", "32"),
        watch=[tmp_path],
        runner=in_process,
    )
    assert (
        "holds a prepared dataset" in message and "--seq-len (was 64, now 32)" in message and "--overwrite" in message
    )

    edited = tmp_path / "edited.trees.jsonl"
    edited.write_text(oasst_trees_file.read_text().replace("Question number 3?", "Question number three?"))
    message = refused(PREPARE, *prepare_args(edited, gpt2_tokenizer_dir, output), watch=[tmp_path], runner=in_process)
    assert "made from other inputs: the data" in message

    result = in_process(
        PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, output, "--seq-len", "32", "--overwrite")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_processed(output).meta["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "edited.trees.jsonl"], (
        "the old dataset, a staging directory or a lock file was left behind"
    )


def test_an_existing_file_as_output_dir_is_refused(in_process, tmp_path, oasst_trees_file, gpt2_tokenizer_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    message = refused(
        PREPARE, *prepare_args(oasst_trees_file, gpt2_tokenizer_dir, notes), watch=[tmp_path], runner=in_process
    )
    assert message == (
        f"error: cannot write to {notes}: {notes} is a file, not a directory; choose another directory with "
        "--output-dir."
    )
    assert notes.read_text() == "keep me\n"


def write_array(path, trees_file, indent=None):
    path.write_text(json.dumps([json.loads(line) for line in trees_file.read_text().splitlines()], indent=indent))
    return path


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("directory", "is a directory; pass an OASST export file (.jsonl, .jsonl.gz or .parquet) with --data-file."),
        ("empty", "holds no records; pass a non-empty OASST export with --data-file."),
        ("array.json", "holds one JSON array, but OASST exports are JSON Lines (one message or tree per line)"),
        ("array.jsonl", "holds one JSON array, but OASST exports are JSON Lines (one message or tree per line)"),
        (
            "indented array.json",
            "holds one JSON array, but OASST exports are JSON Lines (one message or tree per line)",
        ),
    ],
)
@pytest.mark.parametrize("skip_bad_lines", [False, True])
def test_an_unusable_data_file_is_refused_before_anything_is_created(
    kind, expected, skip_bad_lines, in_process, tmp_path, oasst_trees_file, gpt2_tokenizer_dir
):
    data_file = tmp_path / ("export.jsonl" if kind in ("directory", "empty") else kind.split()[-1])
    if kind == "directory":
        data_file.mkdir()
    elif kind == "empty":
        data_file.touch()
    else:
        write_array(data_file, oasst_trees_file, indent=2 if kind.startswith("indented") else None)
    # The output's parent does not exist either: a refusal must not create it.
    output = tmp_path / "new" / "data"
    extra = ["--skip-bad-lines"] if skip_bad_lines else []
    message = refused(
        PREPARE, *prepare_args(data_file, gpt2_tokenizer_dir, output, *extra), watch=[tmp_path], runner=in_process
    )
    assert message.startswith(f"error: {data_file} ") or message.startswith(f"error: data file {data_file} "), message
    assert expected in message
    # --skip-bad-lines would drop the whole array: the message must not offer it.
    assert "--skip-bad-lines" not in message


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, oasst_trees_file, suffix):
    path = tmp_path / f"bom{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wb") as stream:
        stream.write(BOM + oasst_trees_file.read_bytes())
    assert read_local_file(path, skip_bad_lines=False) == read_local_file(oasst_trees_file, skip_bad_lines=False)


def test_prepare_reads_a_file_with_a_byte_order_mark_like_one_without(
    in_process, tmp_path, oasst_trees_file, gpt2_tokenizer_dir, processed_dir
):
    bom_file = tmp_path / "windows.jsonl"
    bom_file.write_bytes(BOM + oasst_trees_file.read_bytes())
    result = in_process(PREPARE, *prepare_args(bom_file, gpt2_tokenizer_dir, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    meta, expected = load_processed(tmp_path / "out").meta, load_processed(processed_dir).meta
    assert meta["bad_lines_skipped"] == [] and meta["counts"] == expected["counts"]
    # processed_dir was prepared from the same file without the mark: the same sequences, the same fingerprint.
    assert meta["fingerprint"] == expected["fingerprint"]
