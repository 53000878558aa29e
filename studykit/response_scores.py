"""The evaluation's per-response scores, per_response_nll.npz: written by evaluation, read by the study's report and
by the check that an evaluation is current. One array per scored model and quantity ("<name>/nll", "<name>/tokens"),
aligned by message id and tagged with each response's conversation tree."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from studykit.errors import first_line
from studykit.io import DamagedFile, atomic_file
from studykit.metrics import SequenceScores

PER_RESPONSE_FILE = "per_response_nll.npz"
# Keys of the --extra-eval scores: "extra/<name>/nll", beside "<name>/nll" for OASST.
EXTRA_EVAL_PREFIX = "extra/"


def save_per_response_scores(
    path: Path, scores_by_name: dict[str, SequenceScores], message_ids: list[str], tree_ids: list[str]
) -> None:
    """Per-response NLL and token counts, aligned by message id and tagged with the conversation tree (for intervals
    that resample whole trees, and paired comparisons)."""
    arrays = {"message_id": np.asarray(message_ids), "message_tree_id": np.asarray(tree_ids)}
    for name, scores in scores_by_name.items():
        arrays[f"{name}/nll"] = scores.nll_sums
        arrays[f"{name}/tokens"] = scores.token_counts
    with atomic_file(path) as temp:
        np.savez(temp, **arrays)


def load_per_response(path: Path) -> dict[str, Any]:
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # what numpy's zip reader raises
        raise DamagedFile(path, first_line(error), "run the study again: it evaluates again") from None
