"""The analysis's figures (matplotlib's Agg backend, one PNG each at figures.DPI): the gap by bucket, the spectra of
the weight change, the layer x module map of effective rank and intruders, and the mitigation curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from studykit.figures import DPI, _pyplot

SPECTRUM_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
NOISE_FLOOR = 1e-5


def plot_gap_by_bucket(gaps: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per bucket family: each bucket's contribution to the gap (nats per test token) per LoRA run, with
    its 95% interval over seeds and trees; the bars of a panel add up to the run's total gap."""
    pyplot = _pyplot()
    families = list(next(iter(gaps.values()))["families"])
    figure, axes_list = pyplot.subplots(1, len(families), figsize=(5 * len(families), 4.5), squeeze=False)
    for axes, family in zip(axes_list[0], families):
        labels = list(dict.fromkeys(row["bucket"] for gap in gaps.values() for row in gap["families"][family]))
        width = 0.8 / len(gaps)
        for index, (run, gap) in enumerate(gaps.items()):
            rows = {row["bucket"]: row for row in gap["families"][family]}
            values = [rows[label]["gap_contribution"] if label in rows else 0.0 for label in labels]
            errors = np.array(
                [
                    (
                        [values[i] - rows[label]["interval"][0], rows[label]["interval"][1] - values[i]]
                        if label in rows and rows[label]["interval"]
                        else [0.0, 0.0]
                    )
                    for i, label in enumerate(labels)
                ]
            ).T
            positions = np.arange(len(labels)) + (index - (len(gaps) - 1) / 2) * width
            axes.bar(positions, values, width, yerr=np.abs(errors), capsize=3, color=f"C{index + 1}", label=run)
        axes.axhline(0, color="black", linewidth=0.8)
        axes.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axes.set_title(family.replace("_", " "))
        axes.grid(axis="y", alpha=0.3)
    axes_list[0][0].set_ylabel("contribution to the gap to full FT\n(nats per test token)")
    axes_list[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return path


def plot_spectra(spectra: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Per module kind, the singular values of dW (mean over layers, the sweep seed's training) of every run, log
    scale: full FT's spread over many directions, LoRA's stop at its rank."""
    pyplot = _pyplot()
    kinds = [kind for kind in SPECTRUM_KINDS if any(kind in by_kind for by_kind in spectra.values())]
    figure, axes_list = pyplot.subplots(1, max(len(kinds), 1), figsize=(4.2 * max(len(kinds), 1), 3.8), squeeze=False)
    for axes, kind in zip(axes_list[0], kinds):
        for index, (run, by_kind) in enumerate(spectra.items()):
            if kind in by_kind:
                values = by_kind[kind]
                # Below this the values are float32 rounding, not change: a LoRA dW of rank r has r singular values.
                kept = values[values > values[0] * NOISE_FLOOR]
                axes.plot(np.arange(1, len(kept) + 1), kept, color=f"C{index}", label=run)
        axes.set_yscale("log")
        axes.set_xscale("log")
        axes.set_title(kind)
        axes.set_xlabel("singular value index")
        axes.grid(alpha=0.3)
    axes_list[0][0].set_ylabel("singular value of dW")
    # Every run has its colour in the legend, also those that changed only some module kinds.
    handles = {}
    for axes in axes_list[0]:
        for line in axes.get_lines():
            handles.setdefault(line.get_label(), line)
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return path


def plot_rank_map(weights: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """Per run, a layer x module-kind map: colour is dW's effective rank (one scale for all runs), the number in a
    cell its intruder dimensions (mean over seeds); blank where the run did not change that module."""
    pyplot = _pyplot()
    kinds = sorted({entry["kind"] for run in weights.values() for entry in run.values()})
    layers = sorted(
        {entry["layer"] for run in weights.values() for entry in run.values() if entry["layer"] is not None}
    )
    highest = max((entry["effective_rank"] for run in weights.values() for entry in run.values()), default=1.0)
    figure, axes_list = pyplot.subplots(
        1, len(weights), figsize=(1.0 + 0.75 * len(kinds) * len(weights), 1.8 + 0.35 * len(layers)), squeeze=False
    )
    image = None
    for axes, (run, modules) in zip(axes_list[0], weights.items()):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for entry in modules.values():
            if entry["layer"] is None:
                continue
            row, column = layers.index(entry["layer"]), kinds.index(entry["kind"])
            grid[row, column] = entry["effective_rank"]
            axes.text(column, row, f"{entry['intruders']:g}", ha="center", va="center", fontsize=7)
        image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=highest)
        axes.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        axes.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        axes.set_title(run, fontsize=9)
    axes_list[0][0].set_ylabel("layer")
    if image is not None:
        figure.colorbar(image, ax=list(axes_list[0]), label="effective rank of dW (numbers: intruders)")
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot.close(figure)
    return path


def plot_mitigation(mitigation: dict[str, Any], path: Path) -> Path:
    """Test perplexity against forgetting as the intruder directions are scaled by lambda (1: as trained), per LoRA
    training, with full FT's point: a curve that moves left without moving up would put forgetting in the intruders."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5))
    for index, (name, curve) in enumerate(mitigation["trainings"].items()):
        points = [(p["forgetting"], p["test_perplexity"], p["lambda"]) for p in curve if p["forgetting"] is not None]
        if not points:
            points = [(p["lambda"], p["test_perplexity"], p["lambda"]) for p in curve]
        x, y, scales = zip(*points)
        axes.plot(x, y, marker="o", color=f"C{index + 1}", label=name)
        for x_value, y_value, scale in points:
            axes.annotate(f"λ={scale:g}", (x_value, y_value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    reference = mitigation["reference"]
    if reference.get("training") and reference.get("forgetting") is not None:
        axes.scatter([reference["forgetting"]], [reference["test_perplexity"]], marker="*", s=160, color="C0", zorder=3)
        axes.annotate(reference["training"], (reference["forgetting"], reference["test_perplexity"]), fontsize=8)
    has_forgetting = any(p["forgetting"] is not None for c in mitigation["trainings"].values() for p in c)
    axes.set_xlabel(
        "forgetting: Δ NLL per token on the general text vs base" if has_forgetting else "lambda (no general text)"
    )
    axes.set_ylabel("test perplexity")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return path


def layer_mean_spectrum(part: dict[str, np.ndarray], kind: str) -> Optional[np.ndarray]:
    """Mean over layers of the singular values of dW for one module kind (None when the training did not change it)."""
    from studykit.weight_change import module_position

    rows = [
        part[f"{module}/singular_values"] for module in part["modules"].tolist() if module_position(module)[1] == kind
    ]
    if not rows:
        return None
    length = min(len(row) for row in rows)
    return np.mean([row[:length] for row in rows], axis=0)
