"""The report's figures, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_loss_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training loss per logged step and validation loss where it was measured, every run on one figure."""
    pyplot = _pyplot()
    figure, (train_axes, validation_axes) = pyplot.subplots(1, 2, figsize=(11, 4), sharey=True)
    for index, (name, entries) in enumerate(logs.items()):
        color = f"C{index % 10}"
        train = [(e["step"], e["train_loss"]) for e in entries if "train_loss" in e]
        validation = [(e["step"], e["validation_loss"]) for e in entries if "validation_loss" in e]
        if train:
            train_axes.plot(*zip(*train), color=color, label=name)
        if validation:
            validation_axes.plot(*zip(*validation), color=color, marker="o", label=name)
    for axes, title in ((train_axes, "training loss"), (validation_axes, "validation loss")):
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
    train_axes.set_ylabel("mean NLL per token")
    validation_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def plot_perplexity_vs_params(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out perplexity against trainable parameters (log scale) with 95% bars; the frozen base is a line."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5))
    # Runs keep the colours they have in the loss curves; the base model is not a run.
    for index, row in enumerate(row for row in rows if row["trainable_params"]):
        low, high = row["perplexity_ci"] or (row["perplexity"], row["perplexity"])
        axes.errorbar(row["trainable_params"], row["perplexity"],
                      yerr=[[row["perplexity"] - low], [high - row["perplexity"]]],
                      fmt="o", capsize=4, color=f"C{index % 10}", label=row["name"])
    for row in rows:
        if not row["trainable_params"]:
            axes.axhline(row["perplexity"], color="gray", linestyle="--", label=f"{row['name']} (frozen)")
            if row["perplexity_ci"]:
                axes.axhspan(*row["perplexity_ci"], color="gray", alpha=0.15)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("validation perplexity (95% CI)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
