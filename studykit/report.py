"""The study's report: bootstrap intervals, the same-budget check, Markdown tables, figures and the README block."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from studykit.errors import UserError

# What two runs must share to be compared at all; each is recorded in the run's run.json. The learning rate is
# left out on purpose: it is the one setting the methods are expected to need differently. `kernels` (attention,
# MLP activation, loss) is there so both methods are computed alike.
BUDGET_FIELDS = ("data_fingerprint", "validation_fingerprint", "seq_len", "effective_batch", "steps", "seed", "kernels")
CONFIDENCE = 0.95
# Below this many texts a bootstrap "interval" only lists the few texts' own perplexities; none is given.
MIN_TEXTS_FOR_INTERVAL = 20
# Bootstrap resamples are drawn this many at a time, so memory stays at CHUNK x responses indices.
BOOTSTRAP_CHUNK = 200
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def format_params(count: int) -> str:
    return f"{count:,}" if count else "0 (frozen)"


def format_results_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| Method | Trainable params | Perplexity |", "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} ({row['method']}) | {format_params(row['trainable_params'])} | {row['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Bootstrap over held-out responses
# ---------------------------------------------------------------------------------------------------------


def _resampled_sums(columns: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Sums of each column over `resamples` bootstrap resamples of the rows (responses), one row of sums per column.
    The same seed draws the same resamples, so every run is resampled on the same responses."""
    rng = np.random.default_rng(seed)
    count = len(columns[0])
    sums = np.empty((len(columns), resamples))
    for start in range(0, resamples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, resamples - start)
        indices = rng.integers(0, count, size=(size, count))
        for column, values in enumerate(columns):
            sums[column, start : start + size] = np.asarray(values, dtype=np.float64)[indices].sum(axis=1)
    return sums


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int) -> Optional[tuple[float, float]]:
    """95% interval of the token-weighted perplexity exp(sum NLL / sum tokens), resampling whole responses
    (None for fewer than MIN_TEXTS_FOR_INTERVAL)."""
    if len(nll) < MIN_TEXTS_FOR_INTERVAL:
        return None
    nll_sums, token_sums = _resampled_sums([nll, tokens], resamples, seed)
    return _percentile_interval(np.exp(nll_sums / token_sums))


def paired_ratio(nll: np.ndarray, reference_nll: np.ndarray, tokens: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """Perplexity ratio of a model to a reference scored on the same responses, with a paired bootstrap interval:
    each resample takes the same responses for both, so what the two share (hard responses) cancels."""
    difference = np.asarray(nll, dtype=np.float64) - np.asarray(reference_nll, dtype=np.float64)
    ratio = math.exp(difference.sum() / np.sum(tokens))
    if len(difference) < MIN_TEXTS_FOR_INTERVAL:
        return {"ratio": ratio, "ci_low": None, "ci_high": None}
    difference_sums, token_sums = _resampled_sums([difference, tokens], resamples, seed)
    low, high = _percentile_interval(np.exp(difference_sums / token_sums))
    return {"ratio": ratio, "ci_low": low, "ci_high": high}


# ---------------------------------------------------------------------------------------------------------
# Same-budget check
# ---------------------------------------------------------------------------------------------------------


def budget_differences(records: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """For each run, the budget fields whose value differs from the reference run's: {run: {field: value}}."""
    expected = records[reference]
    return {name: {key: record.get(key) for key in BUDGET_FIELDS if record.get(key) != expected.get(key)}
            for name, record in records.items()}


# ---------------------------------------------------------------------------------------------------------
# Assembling the report from what the stages wrote
# ---------------------------------------------------------------------------------------------------------


def build_report(eval_rows: list[dict[str, Any]], per_response: dict[str, np.ndarray], run_records: dict[str, dict[str, Any]],
                 resamples: int, seed: int) -> dict[str, Any]:
    """Rows for the base model and every run, with intervals, the paired comparison to full FT and the budget check."""
    rows_by_name = {row["name"]: row for row in eval_rows}
    missing = [name for name in run_records if name not in rows_by_name]
    if missing:
        raise UserError(f"the evaluation has no rows for run(s) {missing}; run the study again so it evaluates them.")
    full_runs = [name for name, record in run_records.items() if record["method"] == "full"]
    reference = full_runs[0] if full_runs else None
    differences = budget_differences(run_records, reference or next(iter(run_records))) if run_records else {}
    tokens = per_response[f"{eval_rows[0]['name']}/tokens"]
    names = (["base"] if "base" in rows_by_name else []) + list(run_records)
    rows = []
    for name in names:
        eval_row, record = rows_by_name[name], run_records.get(name, {})
        nll = per_response[f"{name}/nll"]
        interval = perplexity_interval(nll, tokens, resamples, seed)
        total = record.get("total_params") or eval_row.get("total_params")
        row = {
            "name": name,
            "method": record.get("method", "base"),
            "lr": record.get("config", {}).get("lr"),
            "lora": record.get("lora"),
            "trainable_params": record.get("trainable_params", 0),
            "total_params": total,
            "trainable_percent": 100.0 * record.get("trainable_params", 0) / total if total else 0.0,
            "perplexity": eval_row["perplexity"],
            "perplexity_ci": list(interval) if interval else None,
            "validation_tokens": eval_row["tokens"],
            "validation_responses": eval_row["responses"],
            "vs_full_ft": paired_ratio(nll, per_response[f"{reference}/nll"], tokens, resamples, seed) if reference and name != reference else None,
            "budget": {key: record.get(key) for key in BUDGET_FIELDS} if record else None,
            "budget_differences": differences.get(name, {}),
            "trained_on_other_data": bool(eval_row.get("trained_on_other_data")),
        }
        for key in ("extra_eval", "extra_eval_perplexity", "extra_eval_tokens"):
            if key in eval_row:
                row[key] = eval_row[key]
        if f"extra/{name}/nll" in per_response:
            extra_interval = perplexity_interval(per_response[f"extra/{name}/nll"], per_response[f"extra/{name}/tokens"], resamples, seed)
            row["extra_eval_perplexity_ci"] = list(extra_interval) if extra_interval else None
        if record:
            row.update({key: record.get(key) for key in ("steps", "tokens_seen", "wall_time_seconds", "tokens_per_second", "mfu",
                                                         "peak_memory_bytes", "peak_memory_kind", "checkpoint_bytes", "effective_batch", "seed")})
        rows.append(row)
    return {"reference_run": reference, "budget_fields": list(BUDGET_FIELDS), "confidence": CONFIDENCE,
            "bootstrap_resamples": resamples, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def format_bytes(count: Optional[int]) -> str:
    if not count:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_interval(value: float, interval: Optional[Sequence[Optional[float]]]) -> str:
    if not interval or interval[0] is None:
        return f"{value:.3f} (under {MIN_TEXTS_FOR_INTERVAL} texts: no interval)"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def describe_method(row: dict[str, Any]) -> str:
    if row["method"] != "lora" or not row.get("lora"):
        return {"base": "base (no training)", "full": "full FT"}.get(row["method"], row["method"])
    lora = row["lora"]
    variants = [label for label, on in (("rsLoRA", lora.get("use_rslora")), ("DoRA", lora.get("use_dora"))) if on]
    if lora.get("loraplus_lr_ratio"):
        variants.append(f"LoRA+ x{lora['loraplus_lr_ratio']:g}")
    targets = ",".join(lora.get("target_modules") or [])
    return f"LoRA r={lora['rank']} a={lora['alpha']:g} {targets}" + (f" ({', '.join(variants)})" if variants else "")


def format_study_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    extra = next((row["extra_eval"] for row in rows if row.get("extra_eval")), None)
    extra_label = Path(extra).name if extra and Path(extra).is_file() else extra
    reference = report["reference_run"]
    header = ["Run", "Method", "LR", "Trainable params", "% of total", "Perplexity [95% CI]",
              f"Ratio to {reference} [95% CI]" if reference else None, f"{extra_label} perplexity" if extra else None,
              "Train tokens", "Steps", "Wall time", "Tokens/s", "Peak memory", "Checkpoint", "Same budget"]
    header = [column for column in header if column]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    for row in rows:
        trained = row["method"] != "base"
        cells = [row["name"], describe_method(row), f"{row['lr']:g}" if row.get("lr") else "-",
                 format_params(row["trainable_params"]), f"{row['trainable_percent']:.3f}%",
                 format_interval(row["perplexity"], row["perplexity_ci"])]
        if reference:
            comparison = row.get("vs_full_ft")
            cells.append(format_interval(comparison["ratio"], [comparison["ci_low"], comparison["ci_high"]]) if comparison else "1 (reference)" if row["name"] == reference else "-")
        if extra:
            cells.append(format_interval(row["extra_eval_perplexity"], row["extra_eval_perplexity_ci"]) if "extra_eval_perplexity" in row else "-")
        memory_kind = "GPU" if row.get("peak_memory_kind", "").startswith("cuda") else "RSS"
        cells += [f"{row['tokens_seen']:,}" if trained else "-", str(row["steps"]) if trained else "-",
                  format_seconds(row.get("wall_time_seconds")) if trained else "-",
                  format_throughput(row) if trained else "-",
                  f"{format_bytes(row.get('peak_memory_bytes'))} ({memory_kind})" if trained else "-",
                  format_bytes(row.get("checkpoint_bytes")) if trained else "-", budget_cell(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_throughput(row: dict[str, Any]) -> str:
    """Real tokens per second, with the model FLOPs utilisation where the device's peak is known."""
    mfu = row.get("mfu")
    return f"{row['tokens_per_second']:,.0f}" + (f" ({mfu:.1%} MFU)" if mfu is not None else "")


def budget_cell(row: dict[str, Any]) -> str:
    if row["method"] == "base":
        return "-"
    problems = [f"{key}={value}" for key, value in row["budget_differences"].items()]
    if row.get("trained_on_other_data"):
        problems.append("trained on other data than evaluated")
    return f"**NO: {', '.join(problems)}**" if problems else "yes"


def format_budget_check(report: dict[str, Any]) -> str:
    runs = [row for row in report["rows"] if row["method"] != "base"]
    reference = report["reference_run"] or (runs[0]["name"] if runs else None)
    differing = {key for row in runs for key in row["budget_differences"]}
    lines = ["## Same-budget check", ""]
    agree = [key for key in report["budget_fields"] if key not in differing]
    if agree:
        lines.append(f"Every run shares with {reference}: {', '.join(agree)}.")
    for key in report["budget_fields"]:
        if key in differing:
            values = ", ".join(f"{row['name']}: {row['budget'][key]}" for row in runs)
            lines.append(f"**{key} differs** ({values}); those runs are flagged in the table and are not a controlled comparison.")
    other_data = [row["name"] for row in runs if row.get("trained_on_other_data")]
    if other_data:
        lines.append(f"**Trained on other data than the validation set evaluated:** {', '.join(other_data)}.")
    learning_rates = ", ".join(f"{row['name']} {row['lr']:g}" for row in runs if row.get("lr"))
    lines.append(f"The learning rate differs by design ({learning_rates}).")
    return "\n".join(lines) + "\n"


def format_results_markdown(report: dict[str, Any], protocol: str, figures: Sequence[str]) -> str:
    parts = ["# Study results", "", protocol, "", format_study_table(report), format_budget_check(report)]
    confidence = f"{report['confidence']:.0%}"
    parts.append(f"Intervals: {confidence} percentile bootstrap over held-out responses ({report['bootstrap_resamples']:,} resamples); "
                 "a ratio's interval is paired (the same resampled responses for both models). They cover the choice of "
                 "responses, not training's randomness: runs with another seed can differ by more. Peak memory: GPU memory "
                 "allocated by tensors on CUDA, else the training process's peak resident set size.\n")
    parts += [f"![{Path(figure).stem}]({Path(figure).name})" for figure in figures]
    return "\n".join(parts) + "\n"


def format_samples_markdown(prompts: Sequence[dict[str, str]], continuations: dict[str, list[str]], max_new_tokens: int) -> str:
    lines = ["# Side-by-side samples", "",
             f"Greedy continuations ({max_new_tokens} new tokens at most) of the opening prompts of held-out conversation "
             "trees. The models were trained on assistant responses alone, never on a prompt followed by its answer, so "
             "this shows each model's style of text, not instruction following.", ""]
    for index, prompt in enumerate(prompts):
        lines += [f"## Prompt {index + 1} (tree {prompt['message_tree_id']})", "", quote(prompt["text"]), ""]
        for name, texts in continuations.items():
            lines += [f"**{name}**", "", quote(texts[index]), ""]
    return "\n".join(lines)


def quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(no text: the model ended it at once with EOS)").splitlines())


# ---------------------------------------------------------------------------------------------------------
# README block
# ---------------------------------------------------------------------------------------------------------


def replace_marked_block(text: str, block: str, where: str) -> str:
    """Replace what lies between the results markers; every byte outside them stays as it was."""
    start = text.find(README_START)
    end = text.find(README_END, start + len(README_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise UserError(f"{where} has no '{README_START}' ... '{README_END}' block; add those two lines where the "
                        "results should go, or pass --no-readme.")
    return text[: start + len(README_START)] + "\n" + block.strip("\n") + "\n" + text[end:]


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


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
        axes.errorbar(row["trainable_params"], row["perplexity"], yerr=[[row["perplexity"] - low], [high - row["perplexity"]]],
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
