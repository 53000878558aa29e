"""When LoRA falls behind: the report's learning curves (dev loss against training tokens, the seeds' spread as a
band, each run's departure from full fine-tuning's curve) and its data-size axis (the test-perplexity gap to full
fine-tuning at each --train-fraction, per LoRA shape, and the data size from which that gap is distinguishable from
zero). Each comparison is with the full fine-tuning run trained on the same share of the data.

The curves read dev losses (log.jsonl); the gap reads the test split's per-response scores, after every choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from studykit import figures
from studykit.learning_curves import curves_summary, seed_curves
from studykit.methods import METHODS
from studykit.run_dir import RUN_LOG, read_run_log
from studykit.run_state import RunRecord
from studykit.statistics import paired_ratio_seeds_and_trees
from studykit.study_file import Study, Training
from studykit.subsets import subset_indices


def references_by_fraction(study: Study) -> dict[float, str]:
    """For each --train-fraction the study trains on, the first full fine-tuning run trained on it."""
    references: dict[float, str] = {}
    for spec in study.runs:
        if METHODS[spec.method].reference:
            references.setdefault(spec.config.train_fraction, spec.name)
    return references


def learning_curves(study: Study, chosen: dict[str, list[Training]]) -> dict[str, Any]:
    """Every run's dev-loss curve at its chosen rate over its seeds, and each one's departure from the curve of the full
    fine-tuning run of its data size."""
    references = references_by_fraction(study)
    summary: dict[str, Any] = {}
    for fraction in sorted({spec.config.train_fraction for spec in study.runs}):
        curves = {}
        for spec in study.runs:
            if spec.config.train_fraction != fraction:
                continue
            logs = [read_run_log(Path(t.config.output_dir) / RUN_LOG) for t in chosen[spec.name]]
            curve = seed_curves(logs)
            if curve is not None:
                curves[spec.name] = curve
        for name, entry in curves_summary(references.get(fraction, ""), curves).items():
            summary[name] = {**entry, "reference": references.get(fraction), "train_fraction": fraction}
    # In the study's order, so each run keeps the colour it has in the other figures.
    return {spec.name: summary[spec.name] for spec in study.runs if spec.name in summary}


def training_tokens_by_fraction(data_dir: Path, fractions: list[float]) -> dict[float, int]:
    """The tokens of the training responses in each fraction of the trees (what the model can learn from)."""
    import datasets

    train = datasets.load_from_disk(str(data_dir))["train"]
    lengths = [len(ids) for ids in train["input_ids"]]
    trees = train["message_tree_id"]
    return {fraction: sum(lengths[i] for i in subset_indices(trees, fraction)) for fraction in fractions}


def data_size_gaps(
    study: Study,
    chosen: dict[str, list[Training]],
    records: dict[str, RunRecord],
    per_response: dict[str, np.ndarray],
) -> Optional[dict[str, Any]]:
    """Per LoRA shape (rank, targets, variant), the paired test-perplexity ratio to full fine-tuning at each data size
    (seeds paired, interval over seeds and test trees), and the smallest size from which every larger one's interval
    excludes 1. None when the study trains on one data size."""
    fractions = sorted({spec.config.train_fraction for spec in study.runs})
    references = references_by_fraction(study)
    if len(fractions) < 2 or len(references) < 2:
        return None
    tokens_at = training_tokens_by_fraction(study.data_dir, fractions)
    resamples, seed = study.report.bootstrap_resamples, study.report.bootstrap_seed
    test_tokens, tree_ids = per_response["base/tokens"], per_response["message_tree_id"]

    def nll(run: str) -> np.ndarray:
        return np.stack([per_response[f"{t.name}/nll"] for t in chosen[run]])

    shapes: dict[str, list[dict[str, Any]]] = {}
    for spec in study.runs:
        fraction = spec.config.train_fraction
        reference = references.get(fraction)
        if METHODS[spec.method].reference or reference is None:
            continue
        ratio = paired_ratio_seeds_and_trees(nll(spec.name), nll(reference), test_tokens, tree_ids, resamples, seed)
        distinguishable = ratio["ci_low"] is not None and (ratio["ci_low"] > 1 or ratio["ci_high"] < 1)
        shape = METHODS[spec.method].describe(records[chosen[spec.name][0].name])
        shapes.setdefault(shape, []).append(
            {
                "run": spec.name,
                "reference": reference,
                "train_fraction": fraction,
                "training_tokens": tokens_at[fraction],
                "ratio": ratio["ratio"],
                "ci_low": ratio["ci_low"],
                "ci_high": ratio["ci_high"],
                "covers": ratio["covers"],
                "distinguishable": distinguishable,
            }
        )
    summary = {}
    # A shape trained on one data size has no axis to draw; its ratio is in the main table.
    for shape, points in ((shape, points) for shape, points in shapes.items() if len(points) >= 2):
        points.sort(key=lambda point: point["train_fraction"])
        first = None
        for index in range(len(points) - 1, -1, -1):
            if not points[index]["distinguishable"]:
                break
            first = points[index]
        summary[shape] = {
            "points": points,
            "distinguishable_from": (
                {"train_fraction": first["train_fraction"], "training_tokens": first["training_tokens"]}
                if first
                else None
            ),
        }
    return {"fractions": fractions, "training_tokens": {repr(f): tokens_at[f] for f in fractions}, "shapes": summary}


def format_falling_behind(curves: dict[str, Any], sizes: Optional[dict[str, Any]]) -> str:
    """The results.md sections: each LoRA run's departure point, and the gap at each data size."""
    departures = {name: entry for name, entry in curves.items() if "departure" in entry}
    lines = []
    if departures:
        lines += [
            "## When LoRA falls behind",
            "",
            'Dev loss against training tokens at the chosen rate (learning_curves.png; with eval_schedule = "log" '
            "after steps 1, 2, 4, 8, ... too). A run's departure point is the first point from which, at every later "
            "point, all its seeds' dev losses lie on one side of all the seeds of the full fine-tuning run trained on "
            "the same data (the gap stays outside the seeds' spread); it covers training noise over the seeds and "
            "leaves out which texts are in the dev split.",
            "",
            "| Run | Compared with | Departure (outside the seeds' spread from here on) | Dev loss gap at the end |",
            "|---|---|---|---:|",
        ]
        for name, entry in departures.items():
            reference = curves[entry["reference"]]
            gap = entry["mean_dev_loss"][-1] - reference["mean_dev_loss"][-1]
            lines.append(f"| {name} | {entry['reference']} | {entry['departure']['text']} | {gap:+.4f} |")
        lines.append("")
    if sizes:
        lines += [
            "## The gap by data size",
            "",
            "Test perplexity of each LoRA run over the full fine-tuning run trained on the same share of the training "
            "conversation trees (--train-fraction; nested subsets, dev and test whole), each at its own rate chosen "
            "on dev (gap_vs_data_size.png). A gap is distinguishable from zero where the 95% interval of the ratio "
            "excludes 1; it covers seeds and test conversation trees.",
            "",
            "| LoRA | "
            + " | ".join(f"{f:g} ({sizes['training_tokens'][repr(f)]:,} tokens)" for f in sizes["fractions"])
            + " | Distinguishable from |",
            "|---|" + "---:|" * len(sizes["fractions"]) + "---|",
        ]
        for shape, entry in sizes["shapes"].items():
            at = {point["train_fraction"]: point for point in entry["points"]}
            cells = [
                (
                    f"{at[f]['ratio']:.3f}"
                    + (f" [{at[f]['ci_low']:.3f}, {at[f]['ci_high']:.3f}]" if at[f]["ci_low"] is not None else "")
                    if f in at
                    else "-"
                )
                for f in sizes["fractions"]
            ]
            start = entry["distinguishable_from"]
            found = (
                f"{start['train_fraction']:g} of the data ({start['training_tokens']:,} tokens) and above"
                if start
                else "no data size tried"
            )
            lines.append(f"| {shape} | " + " | ".join(cells) + f" | {found} |")
        lines.append("")
    return "\n".join(lines)


def draw_falling_behind_figures(
    curves: dict[str, Any], sizes: Optional[dict[str, Any]], results_dir: Path
) -> list[Path]:
    paths = []
    if curves:
        paths.append(figures.plot_learning_curves(curves, results_dir / "learning_curves.png"))
    if sizes:
        paths.append(figures.plot_gap_vs_data_size(sizes, results_dir / "gap_vs_data_size.png"))
    return paths
