"""The report's figures, drawn with matplotlib's Agg backend (no display needed). Each saves one PNG at 120 dpi,
closes its figure and returns the path; a run keeps colour C<i> from its place in the input, as in the loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.statistics import pareto_front

DPI = 120

# Past this ratio of largest to smallest perplexity a linear axis flattens the rates that matter (a diverged rate's
# perplexity in the thousands next to good ones near 20), so the dev sweep switches to a log axis.
LOG_PERPLEXITY_SPREAD = 10.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_loss_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training loss per logged step and dev loss where it was measured, every run on one figure."""
    pyplot = _pyplot()
    figure, (train_axes, validation_axes) = pyplot.subplots(1, 2, figsize=(11, 4), sharey=True)
    for index, (name, entries) in enumerate(logs.items()):
        color = f"C{index % 10}"
        train = [(e["step"], e["train_loss"]) for e in entries if "train_loss" in e]
        validation = [(e["step"], e["dev_loss"]) for e in entries if "dev_loss" in e]
        if train:
            train_axes.plot(*zip(*train), color=color, label=name)
        if validation:
            validation_axes.plot(*zip(*validation), color=color, marker="o", label=name)
    for axes, title in ((train_axes, "training loss"), (validation_axes, "dev loss")):
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
    """Test perplexity (mean over seeds, 95% bars over seeds and trees) against trainable parameters (log scale); the
    frozen base is a line. Each row has name, trainable_params and test: {mean_perplexity, ci_low, ci_high}."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(6.5, 4.5))
    # Runs keep the colours they have in the loss curves; the base model is not a run.
    for index, row in enumerate(row for row in rows if row["trainable_params"]):
        test = row["test"]
        value = test["mean_perplexity"]
        low, high = (test["ci_low"], test["ci_high"]) if test["ci_low"] is not None else (value, value)
        axes.errorbar(
            row["trainable_params"],
            value,
            yerr=[[value - low], [high - value]],
            fmt="o",
            capsize=4,
            color=f"C{index % 10}",
            label=row["name"],
        )
    for row in rows:
        if not row["trainable_params"]:
            test = row["test"]
            axes.axhline(test["mean_perplexity"], color="gray", linestyle="--", label=f"{row['name']} (frozen)")
            if test["ci_low"] is not None:
                axes.axhspan(test["ci_low"], test["ci_high"], color="gray", alpha=0.15)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("test perplexity (95% CI)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    pyplot.close(figure)
    return path


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def _save(pyplot, figure, path: Path) -> Path:
    # bbox_inches="tight" keeps a legend placed outside the axes inside the image.
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot.close(figure)
    return path


def _note_left_out(axes, names: Sequence[str], why: str) -> None:
    """Name the runs a panel could not draw, so a missing point reads as missing rather than as absent."""
    if names:
        axes.text(
            0.02,
            0.02,
            f"not shown ({why}): {', '.join(names)}",
            transform=axes.transAxes,
            fontsize="small",
            color="gray",
            va="bottom",
        )


def _edge_of_grid(learning_rates: Sequence[float], chosen_lr: float) -> bool:
    """Whether the chosen rate is the grid's smallest or largest, where the best rate may lie beyond the grid."""
    return any(math.isclose(chosen_lr, edge, rel_tol=1e-9) for edge in (min(learning_rates), max(learning_rates)))


def plot_dev_perplexity_vs_lr(
    sweeps: dict[str, list[tuple[float, float]]],
    chosen: dict[str, float],
    path: Path,
    added: Optional[dict[str, list[float]]] = None,
    at_edge: Optional[set[str]] = None,
) -> Path:
    """Dev perplexity against learning rate (log scale), one line per run from its (lr, dev perplexity) sweep, the
    chosen rate starred, the rates `added` beyond a grid's ends ringed. A run in `at_edge` (default: every run whose
    chosen rate is the smallest or largest it tried) is labelled "(edge: widen the grid)". A rate whose perplexity is
    missing or not finite (it diverged) is left off the line and counted in the label."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    perplexities = []
    for index, (name, sweep) in enumerate(sweeps.items()):
        color = f"C{index % 10}"
        scored = sorted((lr, perplexity) for lr, perplexity in sweep if _finite(perplexity))
        label = name
        flagged = (
            name in at_edge
            if at_edge is not None
            else name in chosen and sweep and _edge_of_grid([lr for lr, _ in sweep], chosen[name])
        )
        if flagged:
            label += " (edge: widen the grid)"
        if len(scored) < len(sweep):
            label += f" ({len(sweep) - len(scored)} of {len(sweep)} rates diverged)"
        axes.plot(
            [lr for lr, _ in scored], [perplexity for _, perplexity in scored], marker="o", color=color, label=label
        )
        starred = [
            (lr, perplexity)
            for lr, perplexity in scored
            if name in chosen and math.isclose(lr, chosen[name], rel_tol=1e-9)
        ]
        if starred:
            axes.plot(*starred[0], marker="*", markersize=18, color=color, markeredgecolor="black", zorder=3)
        ringed = [
            (lr, p) for lr, p in scored if any(math.isclose(lr, a, rel_tol=1e-9) for a in (added or {}).get(name, []))
        ]
        if ringed:
            axes.plot(
                *zip(*ringed), marker="o", markersize=13, linestyle="", markerfacecolor="none", markeredgecolor=color
            )
        perplexities += [perplexity for _, perplexity in scored]
    axes.plot(
        [],
        [],
        marker="*",
        markersize=14,
        linestyle="",
        color="white",
        markeredgecolor="black",
        label="chosen learning rate",
    )
    if any((added or {}).values()):
        axes.plot(
            [],
            [],
            marker="o",
            markersize=12,
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="black",
            label="rate added beyond the grid",
        )
    axes.set_xscale("log")
    if perplexities and max(perplexities) > LOG_PERPLEXITY_SPREAD * min(perplexities):
        axes.set_yscale("log")
    axes.set_xlabel("peak learning rate (log scale)")
    axes.set_ylabel("dev perplexity (lower is better)")
    axes.set_title("learning-rate sweep on the dev split")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(pyplot, figure, path)


def _seed_std(point: dict[str, Any], key: str) -> Optional[float]:
    spread = point.get(key)
    return spread if _finite(spread) else None


def plot_learn_forget(points: list[dict[str, Any]], path: Path) -> Path:
    """Test perplexity (learning) against forgetting (the change in NLL per token on general text from the base
    model), one point per run, with bars of one seed standard deviation on each axis where the run has several seeds.
    Keys: name, test_perplexity, forgetting, and optionally test_perplexity_std and forgetting_std. A run missing
    either value is named in a note instead of drawn."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    left_out = []
    for index, point in enumerate(points):
        forgetting, test_perplexity = point.get("forgetting"), point.get("test_perplexity")
        if not (_finite(forgetting) and _finite(test_perplexity)):
            left_out.append(point["name"])
            continue
        axes.errorbar(
            forgetting,
            test_perplexity,
            xerr=_seed_std(point, "forgetting_std"),
            yerr=_seed_std(point, "test_perplexity_std"),
            fmt="o",
            capsize=4,
            color=f"C{index % 10}",
            label=point["name"],
        )
    axes.axvline(0.0, color="gray", linestyle="--", label="no forgetting (the base model's NLL)")
    _note_left_out(axes, left_out, "a value is missing")
    axes.set_xlabel("forgetting: change in NLL per token on general text from the base (nats; right = forgot more)")
    axes.set_ylabel("test perplexity (lower is better)")
    axes.set_title("learning against forgetting (bars: one standard deviation over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(pyplot, figure, path)


def _training_time_axis(points: Sequence[dict[str, Any]]) -> tuple[str, float]:
    """The training-time label and seconds per unit: minutes unless some run took over two hours, then hours."""
    longest = max(
        (point["wall_time_seconds"] for point in points if _finite(point.get("wall_time_seconds"))), default=0.0
    )
    return ("training time (hours)", 3600.0) if longest > 2 * 3600 else ("training time (minutes)", 60.0)


def plot_cost_vs_quality(points: list[dict[str, Any]], path: Path) -> Path:
    """Test perplexity against three costs, one panel each: peak memory (GiB), training time and training FLOPs (log
    scale). One point per run (keys: name, test_perplexity, peak_memory_bytes, wall_time_seconds, train_flops); in each
    panel the runs on that cost's Pareto front (nothing both cheaper and better) are ringed and joined by a step line.
    A run missing a value is left out of that panel and named in a note there."""
    pyplot = _pyplot()
    from matplotlib.lines import Line2D

    time_label, seconds_per_unit = _training_time_axis(points)
    panels = [
        ("peak memory (GiB)", "peak_memory_bytes", 2.0**30, "linear"),
        (time_label, "wall_time_seconds", seconds_per_unit, "linear"),
        ("training FLOPs (log scale)", "train_flops", 1.0, "log"),
    ]
    figure, all_axes = pyplot.subplots(1, 3, figsize=(14, 4.5), sharey=True)
    for axes, (label, key, unit, scale) in zip(all_axes, panels):
        drawn = [
            (index, point[key] / unit, point["test_perplexity"])
            for index, point in enumerate(points)
            if _finite(point.get(key)) and _finite(point.get("test_perplexity"))
        ]
        for index, cost, test_perplexity in drawn:
            axes.plot(cost, test_perplexity, marker="o", linestyle="", color=f"C{index % 10}")
        front = [
            drawn[position]
            for position in pareto_front([cost for _, cost, _ in drawn], [value for _, _, value in drawn])
        ]
        if front:
            # A step after each front point: the best perplexity any run reaches at this cost or less.
            axes.step(
                [cost for _, cost, _ in front],
                [value for _, _, value in front],
                where="post",
                color="black",
                alpha=0.5,
                zorder=1,
            )
            axes.plot(
                [cost for _, cost, _ in front],
                [value for _, _, value in front],
                marker="o",
                markersize=14,
                linestyle="",
                markerfacecolor="none",
                markeredgecolor="black",
            )
            axes.set_xscale(scale)
        else:
            axes.text(0.5, 0.5, "no run has this measurement", transform=axes.transAxes, ha="center", color="gray")
        drawn_indices = {index for index, _, _ in drawn}
        _note_left_out(
            axes, [point["name"] for index, point in enumerate(points) if index not in drawn_indices], "no value"
        )
        axes.set_xlabel(label)
        axes.grid(alpha=0.3, which="both")
    all_axes[0].set_ylabel("test perplexity (lower is better)")
    figure.suptitle("cost against quality")
    handles = [
        Line2D([], [], marker="o", linestyle="", color=f"C{index % 10}", label=point["name"])
        for index, point in enumerate(points)
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            markersize=14,
            markerfacecolor="none",
            markeredgecolor="black",
            color="black",
            alpha=0.5,
            label="Pareto front: nothing both cheaper and better",
        )
    )
    figure.tight_layout()
    # Below the panels, after tight_layout, so the panels keep their width; the tight save makes room for it.
    figure.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 5), fontsize="small"
    )
    return _save(pyplot, figure, path)


def plot_learning_curves(curves: dict[str, dict[str, Any]], path: Path) -> Path:
    """Dev loss against training tokens (log scale), one line per run (the mean over its seeds) with the seeds' spread
    as a band; a run's departure from the full fine-tuning curve it is compared with is marked with a cross. `curves`:
    results.json's learning_curves (steps, tokens, mean_dev_loss, band, departure)."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7.5, 4.8))
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index % 10}"
        points = [(t, m, b) for t, m, b in zip(curve["tokens"], curve["mean_dev_loss"], curve["band"]) if t > 0]
        if not points:
            continue
        tokens = [t for t, _, _ in points]
        axes.plot(tokens, [m for _, m, _ in points], marker=".", color=color, label=name)
        axes.fill_between(tokens, [b[0] for _, _, b in points], [b[1] for _, _, b in points], color=color, alpha=0.2)
        departure = curve.get("departure") or {}
        if departure.get("tokens"):
            at = curve["tokens"].index(departure["tokens"])
            axes.plot(
                departure["tokens"],
                curve["mean_dev_loss"][at],
                marker="X",
                markersize=12,
                color=color,
                markeredgecolor="black",
                zorder=3,
            )
    axes.plot(
        [],
        [],
        marker="X",
        markersize=10,
        linestyle="",
        color="white",
        markeredgecolor="black",
        label="departure from full FT (gap outside the seeds' spread from here on)",
    )
    axes.set_xscale("log")
    axes.set_xlabel("training tokens seen (log scale)")
    axes.set_ylabel("dev loss (mean NLL per token)")
    axes.set_title("learning curves at the chosen rates (bands: the seeds' spread)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(pyplot, figure, path)


def plot_gap_vs_data_size(data_size: dict[str, Any], path: Path) -> Path:
    """The test-perplexity ratio of each LoRA shape to full fine-tuning on the same data, against the training tokens
    of each data size (log scale), with 95% bars over seeds and test trees; 1 (no gap) is a line."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for index, (shape, entry) in enumerate(data_size["shapes"].items()):
        color = f"C{(index + 1) % 10}"
        points = entry["points"]
        tokens = [point["training_tokens"] for point in points]
        ratios = [point["ratio"] for point in points]
        low = [
            point["ratio"] - (point["ci_low"] if point["ci_low"] is not None else point["ratio"]) for point in points
        ]
        high = [
            (point["ci_high"] if point["ci_high"] is not None else point["ratio"]) - point["ratio"] for point in points
        ]
        axes.errorbar(tokens, ratios, yerr=[low, high], marker="o", capsize=4, color=color, label=shape)
    axes.axhline(1.0, color="gray", linestyle="--", label="no gap (full fine-tuning on the same data)")
    axes.set_xscale("log")
    axes.set_xlabel("training tokens in the data size trained on (log scale)")
    axes.set_ylabel("test perplexity ratio to full FT (95% CI)")
    axes.set_title("the gap to full fine-tuning by data size")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(pyplot, figure, path)
