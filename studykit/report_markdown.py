"""The study's comparison as Markdown: the results table, the intervals note, the sweeps, the same-budget check and
the protocol paragraph, for results.md, the terminal and the README's results block. Reads comparison's typed rows;
writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.comparison import BaseRow, Comparison, Row
from studykit.evaluate import format_params
from studykit.falling_behind import format_falling_behind
from studykit.run_state import RunRecord
from studykit.runtime import code_version
from studykit.statistics import CONFIDENCE
from studykit.study_file import Study, Training

# How the protocol paragraph names each --optimizer.
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "paged-adamw8bit": "paged 8-bit AdamW"}


def format_bytes(count: Optional[float]) -> str:
    if not count:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return (
        f"{seconds / 3600:.2f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.1f} s"
    )


def format_interval(value: float, low: Optional[float], high: Optional[float], digits: int = 3) -> str:
    if low is None:
        return f"{value:.{digits}f} (no interval)"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_test_perplexity(row: Row) -> str:
    """Mean over seeds, the seeds' standard deviation, and the interval over seeds and trees."""
    test = row.test
    spread = f" ± {test.seed_std:.3f}" if test.seed_std is not None else ""
    interval = f" [{test.ci_low:.3f}, {test.ci_high:.3f}]" if test.ci_low is not None else " (no interval)"
    return f"{test.mean_perplexity:.3f}{spread}{interval}"


def format_lr(row: Row) -> str:
    if isinstance(row, BaseRow):
        return "-"
    if len(row.sweep.learning_rates) == 1:
        return f"{row.lr:g} (fixed)"
    return f"{row.lr:g}" + (" (**grid edge**)" if row.sweep.at_edge else "")


def format_throughput(tokens_per_second: float, mfu: Optional[float]) -> str:
    """Real tokens per second, with the model FLOPs utilisation where the device's peak is known."""
    return f"{tokens_per_second:,.0f}" + (f" ({mfu:.1%} MFU)" if mfu is not None else "")


def format_study_table(comparison: Comparison) -> str:
    reference = comparison.reference_run
    forgetting = any(row.forgetting for row in comparison.runs)
    header = [
        "Run",
        "Method",
        "LR (on dev)",
        "Trainable params",
        "% of total",
        "Test perplexity: mean ± seed sd [95% CI]",
        (
            f"Ratio to {reference}"
            + (
                " (or full FT on the same data share)"
                if any(row.reference not in (None, reference) for row in comparison.runs)
                else ""
            )
            + " [95% CI]"
        )
        if reference
        else None,
        "Forgetting: Δ NLL/token vs base [95% CI]" if forgetting else None,
        "Train tokens",
        "Steps",
        "Wall time",
        "Tokens/s",
        "Peak memory",
        "Checkpoint",
        "Same budget",
    ]
    header = [column for column in header if column]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    base = comparison.base
    cells = [base.name, base.description, "-", format_params(0), f"{0.0:.3f}%", format_test_perplexity(base)]
    cells += (["-"] if reference else []) + (["0 (reference)"] if forgetting else []) + ["-"] * 7
    lines.append("| " + " | ".join(cells) + " |")
    for row in comparison.runs:
        cells = [
            row.name,
            row.description,
            format_lr(row),
            format_params(row.trainable_params),
            f"{row.trainable_percent:.3f}%",
            format_test_perplexity(row),
        ]
        if reference:
            ratio = row.vs_reference
            cells.append(
                format_interval(ratio.ratio, ratio.ci_low, ratio.ci_high)
                if ratio
                else "1 (reference)"
                if row.name == (row.reference or reference)
                else "-"
            )
        if forgetting:
            change = row.forgetting
            cells.append(
                f"{change.change:+.4f}"
                + (f" [{change.ci_low:+.4f}, {change.ci_high:+.4f}]" if change.ci_low is not None else "")
                if change
                else "-"
            )
        memory_kind = "GPU" if str(row.peak_memory_kind).startswith("cuda") else "RSS"
        cells += [
            f"{row.tokens_seen:,.0f}",
            f"{row.steps:.0f}",
            format_seconds(row.wall_time_seconds),
            format_throughput(row.tokens_per_second, row.mfu),
            f"{format_bytes(row.peak_memory_bytes)} ({memory_kind})",
            format_bytes(row.checkpoint_bytes),
            budget_cell(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budget_cell(row: Row) -> str:
    if isinstance(row, BaseRow):
        return "-"
    problems = [f"{key}={value}" for key, value in row.budget_differences.items()]
    if row.trained_on_other_data:
        problems.append("trained on other data than evaluated")
    return f"**NO: {', '.join(problems)}**" if problems else "yes"


def format_sweep_table(comparison: Comparison) -> str:
    """Dev perplexity of every rate of every grid (mean over the sweep seeds); the chosen rate in bold."""
    runs = [row for row in comparison.runs if len(row.sweep.learning_rates) > 1]
    if not runs:
        return ""
    lines = [
        "## Learning-rate sweeps",
        "",
        f"Final dev perplexity at each rate of the run's grid (mean over sweep seed(s) {comparison.sweep_seeds}); the "
        "chosen rate, the lowest, is in bold. A choice at an end of its grid added the next rate beyond it (marked "
        "+, at the grid's own spacing, trained with the same seeds) and was made again, up to [budget] "
        "grid_extensions times; a choice is flagged only where that bound stopped the search. A diverged rate (a NaN "
        "loss, or a dev loss far above the best) counts as the worst.",
        "",
        "| Run | Dev perplexity by learning rate | Chosen |",
        "|---|---|---|",
    ]
    for row in runs:
        sweep = row.sweep
        cells = []
        added = {extension["lr"] for extension in sweep.added}
        for lr in sweep.learning_rates:
            perplexity = sweep.dev_perplexity[repr(lr)]
            text = ("+" if lr in added else "") + f"{lr:g}: " + (f"{perplexity:.3f}" if perplexity is not None else "-")
            text += " (diverged)" if lr in sweep.diverged else ""
            cells.append(f"**{text}**" if lr == sweep.chosen_lr else text)
        chosen = f"{sweep.chosen_lr:g}" + (
            f" (**at the grid's edge after {len(added)} added rate(s), the bound: widen the grid**)"
            if sweep.at_edge
            else ""
        )
        lines.append(f"| {row.name} | {'; '.join(cells)} | {chosen} |")
    return "\n".join(lines) + "\n"


def format_budget_check(comparison: Comparison) -> str:
    runs = comparison.runs
    reference = comparison.reference_run or (runs[0].name if runs else None)
    differing = {key for row in runs for key in row.budget_differences}
    lines = [
        "## Same-budget check",
        "",
        f"Each training is compared with {reference}'s training of the same seed (the same data order)"
        + (
            ", or on another share of the training data with the full fine-tuning run on that share."
            if any(row.reference not in (None, reference) for row in runs)
            else "."
        ),
    ]
    agree = [key for key in comparison.budget_fields if key not in differing]
    if agree:
        lines.append(f"Every run shares with {reference}: {', '.join(agree)}.")
    for key in comparison.budget_fields:
        if key in differing:
            values = ", ".join(
                f"{row.name}: {row.budget_differences[key]}" for row in runs if key in row.budget_differences
            )
            lines.append(
                f"**{key} differs** ({values}); those runs are flagged in the table and are not a controlled "
                "comparison."
            )
    other_data = [row.name for row in runs if row.trained_on_other_data]
    if other_data:
        lines.append(f"**Trained on other data than the dataset evaluated:** {', '.join(other_data)}.")
    learning_rates = ", ".join(f"{row.name} {row.lr:g}" for row in runs)
    lines.append(f"The learning rate differs by design: each run's is chosen on the dev split ({learning_rates}).")
    return "\n".join(lines) + "\n"


def format_intervals(comparison: Comparison) -> str:
    runs = comparison.runs
    test_covers = runs[0].test.covers if runs else ""
    ratio = next((row.vs_reference for row in runs if row.vs_reference), None)
    forgetting = next((row.forgetting for row in runs if row.forgetting), None)
    parts = [
        f"**Intervals.** {comparison.confidence:.0%} percentile bootstrap ({comparison.bootstrap_resamples:,} "
        "resamples) that resamples whole conversation trees (all responses of a tree together, since they share a "
        f"prompt and context), and seeds: test perplexity over {test_covers}."
    ]
    if ratio:
        parts.append(
            "Ratios: computed seed by seed against the reference trained on the same seed, combined as a geometric "
            f"mean; the interval covers {ratio.covers}."
        )
    if forgetting:
        parts.append(
            "Forgetting: the change in NLL per token on the general text from the base model (exp of it is the "
            f"perplexity ratio to the base; positive means worse), its interval over {forgetting.covers}."
        )
    parts.append(
        "Costs are means over seeds. Peak memory: GPU memory allocated by tensors on CUDA, else the training process's "
        "peak resident set size."
    )
    return " ".join(parts) + "\n"


def format_results_markdown(comparison: Comparison, protocol: str, figure_paths: Sequence[Path]) -> str:
    """results.md: the protocol, the tables, the budget check and the figures (analysis.py adds its verdict on top)."""
    parts = [
        "# Study results",
        "",
        protocol,
        "",
        format_study_table(comparison),
        format_intervals(comparison),
        format_sweep_table(comparison),
        format_falling_behind(comparison.learning_curves, comparison.data_size),
        format_budget_check(comparison),
    ]
    parts += [f"![{figure.stem}]({figure.name})" for figure in figure_paths]
    return "\n".join(part for part in parts if part is not None) + "\n"


def format_readme_block(comparison: Comparison, protocol: str, link: str) -> str:
    """The README's results block: the protocol, the table and the intervals note, linking to results.md."""
    return (
        f"{protocol}\n\n{format_study_table(comparison)}\n{format_intervals(comparison)}\n"
        f"Sweeps, the same-budget check, figures and samples: [{link}]({link}).\n"
    )


def protocol_paragraph(
    study: Study,
    meta: dict[str, Any],
    chosen: dict[str, list[Training]],
    records: dict[str, RunRecord],
    budgets_differ: bool,
) -> str:
    first_run = study.runs[0].name
    first = records[chosen[first_run][0].name]
    budget = (
        f"Budget of {first_run} (**runs flagged in the table differ from it**)"
        if budgets_differ
        else "Budget, the same for every run"
    )
    config = first.config
    grids = "; ".join(
        f"{spec.name} {[float(f'{lr:g}') for lr in spec.learning_rates]}" for spec in study.runs if spec.sweeps
    )
    widened = (
        f"A choice at an end of its grid adds the next rate beyond it and is made again, up to "
        f"{study.grid_extensions} time(s) per run. "
        if study.grid_extensions
        else ""
    )
    tuning = (
        f"Each run's learning rate is the one of its grid ({grids}) with the lowest final dev loss, trained with "
        f"seed(s) {study.sweep_seeds}; {widened}the chosen rate is then trained with every seed ({study.seeds}). "
        if grids
        else f"Fixed learning rates, each run trained with seed(s) {study.seeds}. "
    )
    # Prepare's --context: what each sequence holds, and so what the perplexity is conditioned on.
    context = (
        "each after the prompter message it answers (prompt tokens are context only: never targets, never counted)"
        if meta.get("context") == "parent"
        else "each on its own, without its prompt"
    )
    optimizer = OPTIMIZER_NAMES.get(first.optimizer, first.optimizer)
    return (
        f"**Protocol.** Data: {meta['source']} ({meta['split_method']}); assistant responses in language(s) "
        f"{meta['lang']}, not deleted, review passed, non-blank, {context}, tokenized with `{meta['tokenizer']}`, "
        "EOS appended, "
        f"cut to {meta['seq_len']} tokens: {meta['sequences']['train']:,} training, {meta['sequences']['dev']:,} dev "
        f"and {meta['sequences']['test']:,} test responses, no conversation tree in two splits (data fingerprint "
        f"`{meta['fingerprint']}`). {budget}: {first.steps:,} optimizer steps of {first.effective_batch} sequences "
        f"({config['batch_size']} x {config['grad_accum']} accumulation), the same data order per seed, {optimizer} "
        f"(betas {config['adam_beta1']:g}/{config['adam_beta2']:g}) with {config['warmup_ratio']:.0%} warmup then "
        f"{config['lr_schedule']} decay, precision {first.precision} on {first.device}. {tuning}Nothing that chooses "
        "reads the test split. Test perplexity is exp(total NLL / predicted tokens) over all test responses, "
        f"{CONFIDENCE:.0%} bootstrap intervals over seeds and conversation trees. Study file `{study.source.name}`, "
        f"code version `{code_version()}`."
    )
