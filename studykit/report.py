"""The study's report: per run, the chosen learning rate and its test perplexity over seeds and conversation trees,
the paired ratio to full fine-tuning, forgetting as a change from the base model, and the cost; the same-budget check;
results.json, results.md, the figures, samples.md and the README's results block.

Every number here is read from what the stages wrote: run.json and log.jsonl of each training, the evaluation's
per-response scores of the test split. The learning rates were chosen before, on the dev split alone
(study_state.sweep_result).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from studykit import figures
from studykit.config import config_to_dict
from studykit.data import META_FILE
from studykit.errors import UserError, first_line
from studykit.evaluate import EXTRA_EVAL_PREFIX, format_params
from studykit.falling_behind import (
    data_size_gaps,
    draw_falling_behind_figures,
    format_falling_behind,
    learning_curves,
    references_by_fraction,
)
from studykit.io import DamagedFile, atomic_write_json, atomic_write_text, read_json
from studykit.methods import METHODS
from studykit.run_dir import RUN_LOG, load_run_record, read_run_log
from studykit.run_state import RunRecord
from studykit.runtime import code_version
from studykit.samples import write_samples
from studykit.statistics import (
    CONFIDENCE,
    nll_change_seeds,
    paired_ratio_seeds_and_trees,
    pareto_front,
    seeds_and_trees,
)
from studykit.study_file import RunSpec, Study, Training

# What two trainings of the same seed must share to be compared: recorded in run.json. The learning rate is left out
# on purpose (each method is tuned on dev); `kernels` (attention, MLP activation, loss) so both are computed alike.
# `optimizer` so both take the same kind of step (8-bit moments move the weights a little differently from fp32 ones).
BUDGET_FIELDS = (
    "training_data_fingerprint",
    "dev_fingerprint",
    "seq_len",
    "effective_batch",
    "steps",
    "seed",
    "packing",
    "kernels",
    "precision",
    "optimizer",
)
# The same, from the training settings: the order of examples and everything about the optimizer but its rate.
BUDGET_SETTINGS = (
    "train_fraction",
    "group_by_length",
    "warmup_ratio",
    "lr_schedule",
    "weight_decay",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)
README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def load_per_response(path: Path) -> dict[str, Any]:
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # what numpy's zip reader raises
        raise DamagedFile(path, first_line(error), "run the study again: it evaluates again") from None


# ---------------------------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------------------------


def budget_of(record: RunRecord) -> dict[str, Any]:
    return {
        **{key: getattr(record, key) for key in BUDGET_FIELDS},
        **{key: record.config.get(key) for key in BUDGET_SETTINGS},
    }


def budget_differences(records: dict[str, RunRecord], reference: str) -> dict[str, dict[str, Any]]:
    """For each training, the budget fields whose value differs from the reference training's: {name: {field:
    value}}."""
    expected = budget_of(records[reference])
    return {
        name: {key: value for key, value in budget_of(record).items() if value != expected[key]}
        for name, record in records.items()
    }


def describe(record: Optional[RunRecord]) -> str:
    return "base (no training)" if record is None else METHODS[record.method].describe(record)


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def build_report(
    study: Study,
    sweeps: dict[str, Any],
    eval_rows: list[dict[str, Any]],
    per_response: dict[str, np.ndarray],
    chosen: dict[str, list[Training]],
    records: dict[str, RunRecord],
) -> dict[str, Any]:
    """Rows for the base model and every run (its chosen rate, every seed), the sweeps and every training."""
    rows_by_name = {row["name"]: row for row in eval_rows}
    missing = [t.name for trainings in chosen.values() for t in trainings if t.name not in rows_by_name]
    if missing:
        raise UserError(
            f"the evaluation has no rows for training(s) {missing[:3]}; run the study again so it evaluates them."
        )
    resamples, seed = study.report.bootstrap_resamples, study.report.bootstrap_seed
    tokens, tree_ids = per_response["base/tokens"], per_response["message_tree_id"]
    extra_tokens = per_response.get(f"{EXTRA_EVAL_PREFIX}base/tokens")
    reference = next((spec.name for spec in study.runs if METHODS[spec.method].reference), None)

    def nll_by_seed(run: str, prefix: str = "") -> np.ndarray:
        return np.stack([per_response[f"{prefix}{training.name}/nll"] for training in chosen[run]])

    base = seeds_and_trees(per_response["base/nll"][None], tokens, tree_ids, resamples, seed)
    rows = [
        {
            "name": "base",
            "method": "base",
            "description": describe(None),
            "trainable_params": 0,
            "total_params": rows_by_name["base"]["total_params"],
            "trainable_percent": 0.0,
            "test": base,
            "test_tokens": int(tokens.sum()),
            "test_responses": len(tokens),
            "extra_eval_perplexity": rows_by_name["base"].get("extra_eval_perplexity"),
        }
    ]
    all_trainings = {t.name: t for trainings in chosen.values() for t in trainings}
    # A run on a share of the training data (--train-fraction) is compared with full fine-tuning on the same share.
    references = references_by_fraction(study)
    for spec in study.runs:
        run_reference = references.get(spec.config.train_fraction, reference)
        reference_records = {t.seed: records[t.name] for t in chosen[run_reference]} if run_reference else {}
        seed_records = [records[t.name] for t in chosen[spec.name]]
        first = seed_records[0]
        test = seeds_and_trees(nll_by_seed(spec.name), tokens, tree_ids, resamples, seed)
        row = {
            "name": spec.name,
            "method": spec.method,
            "description": describe(first),
            "lr": chosen[spec.name][0].lr,
            "sweep": sweeps[spec.name],
            "seeds": [t.seed for t in chosen[spec.name]],
            "trainable_params": first.trainable_params,
            "total_params": first.total_params,
            "trainable_percent": 100.0 * first.trainable_params / first.total_params,
            "test": test,
            "trainings": [t.name for t in chosen[spec.name]],
        }
        row["reference"] = run_reference
        if run_reference and spec.name != run_reference:
            row["vs_reference"] = paired_ratio_seeds_and_trees(
                nll_by_seed(spec.name), nll_by_seed(run_reference), tokens, tree_ids, resamples, seed
            )
        if extra_tokens is not None:
            row["forgetting"] = nll_change_seeds(
                nll_by_seed(spec.name, EXTRA_EVAL_PREFIX),
                per_response[f"{EXTRA_EVAL_PREFIX}base/nll"],
                extra_tokens,
                resamples,
                seed,
            )
        for key in (
            "steps",
            "tokens_seen",
            "wall_time_seconds",
            "tokens_per_second",
            "mfu",
            "peak_memory_bytes",
            "checkpoint_bytes",
            "effective_batch",
        ):
            row[key] = mean([getattr(record, key) for record in seed_records])
        row["peak_memory_kind"] = first.peak_memory_kind
        row["train_flops"] = first.flops_per_token * row["tokens_seen"]
        # Each seed against the reference's training of the same seed: the same data order is what pairs them.
        row["budget_differences"] = {}
        for training, record in zip(chosen[spec.name], seed_records):
            if training.seed in reference_records:
                differences = budget_differences(
                    {"reference": reference_records[training.seed], training.name: record}, "reference"
                )
                row["budget_differences"].update(differences[training.name])
        row["trained_on_other_data"] = any(rows_by_name[t.name].get("trained_on_other_data") for t in chosen[spec.name])
        rows.append(row)
    trainings = [
        training_entry(study, spec, lr, training_seed, records, rows_by_name, per_response)
        for spec in study.runs
        for lr in sweeps[spec.name]["learning_rates"]
        for training_seed in study.seeds
        if study.training(spec, lr, training_seed).name in records
    ]
    return {
        "reference_run": reference,
        "confidence": CONFIDENCE,
        "bootstrap_resamples": resamples,
        "seeds": study.seeds,
        "sweep_seeds": study.sweep_seeds,
        "budget_fields": [*BUDGET_FIELDS, *BUDGET_SETTINGS],
        "rows": rows,
        "trainings": trainings,
        "evaluated_trainings": sorted(all_trainings),
    }


def training_entry(
    study: Study,
    spec: RunSpec,
    lr: float,
    seed: int,
    records: dict[str, RunRecord],
    rows_by_name: dict[str, Any],
    per_response: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Every finished training's numbers, chosen or not: results.json keeps them all."""
    name = study.training(spec, lr, seed).name
    record = records[name]
    entry = {
        "name": name,
        "run": spec.name,
        "lr": lr,
        "seed": seed,
        "final_dev_loss": record.final_dev_loss,
        "dev_perplexity": math.exp(record.final_dev_loss) if record.final_dev_loss is not None else None,
        "steps": record.steps,
        "wall_time_seconds": record.wall_time_seconds,
        "tokens_per_second": record.tokens_per_second,
        "peak_memory_bytes": record.peak_memory_bytes,
        "skipped_steps": record.skipped_steps,
    }
    if name in rows_by_name:
        entry["test_perplexity"] = rows_by_name[name]["perplexity"]
    return entry


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


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


def format_test_perplexity(test: dict[str, Any]) -> str:
    """Mean over seeds, the seeds' standard deviation, and the interval over seeds and trees."""
    spread = f" ± {test['seed_std']:.3f}" if test.get("seed_std") is not None else ""
    interval = f" [{test['ci_low']:.3f}, {test['ci_high']:.3f}]" if test["ci_low"] is not None else " (no interval)"
    return f"{test['mean_perplexity']:.3f}{spread}{interval}"


def format_lr(row: dict[str, Any]) -> str:
    if row["method"] == "base":
        return "-"
    sweep = row["sweep"]
    if len(sweep["learning_rates"]) == 1:
        return f"{row['lr']:g} (fixed)"
    return f"{row['lr']:g}" + (" (**grid edge**)" if sweep["at_edge"] else "")


def format_study_table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    reference = report["reference_run"]
    forgetting = any("forgetting" in row for row in rows)
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
                if any(r.get("reference") not in (None, reference) for r in rows)
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
    for row in rows:
        trained = row["method"] != "base"
        cells = [
            row["name"],
            row["description"],
            format_lr(row),
            format_params(row["trainable_params"]),
            f"{row['trainable_percent']:.3f}%",
            format_test_perplexity(row["test"]),
        ]
        if reference:
            ratio = row.get("vs_reference")
            cells.append(
                format_interval(ratio["ratio"], ratio["ci_low"], ratio["ci_high"])
                if ratio
                else "1 (reference)"
                if row["name"] == row.get("reference", reference)
                else "-"
            )
        if forgetting:
            change = row.get("forgetting")
            cells.append(
                f"{change['change']:+.4f}"
                + (f" [{change['ci_low']:+.4f}, {change['ci_high']:+.4f}]" if change["ci_low"] is not None else "")
                if change
                else "0 (reference)"
                if not trained
                else "-"
            )
        memory_kind = "GPU" if str(row.get("peak_memory_kind", "")).startswith("cuda") else "RSS"
        cells += [
            f"{row['tokens_seen']:,.0f}" if trained else "-",
            f"{row['steps']:.0f}" if trained else "-",
            format_seconds(row.get("wall_time_seconds")) if trained else "-",
            format_throughput(row) if trained else "-",
            f"{format_bytes(row.get('peak_memory_bytes'))} ({memory_kind})" if trained else "-",
            format_bytes(row.get("checkpoint_bytes")) if trained else "-",
            budget_cell(row),
        ]
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


def format_sweep_table(report: dict[str, Any]) -> str:
    """Dev perplexity of every rate of every grid (mean over the sweep seeds); the chosen rate in bold."""
    runs = [row for row in report["rows"] if row["method"] != "base" and len(row["sweep"]["learning_rates"]) > 1]
    if not runs:
        return ""
    lines = [
        "## Learning-rate sweeps",
        "",
        f"Final dev perplexity at each rate of the run's grid (mean over sweep seed(s) {report['sweep_seeds']}); the "
        "chosen rate, the lowest, is in bold. A choice at an end of its grid added the next rate beyond it (marked "
        "+, at the grid's own spacing, trained with the same seeds) and was made again, up to [budget] "
        "grid_extensions times; a choice is flagged only where that bound stopped the search. A diverged rate (a NaN "
        "loss, or a dev loss far above the best) counts as the worst.",
        "",
        "| Run | Dev perplexity by learning rate | Chosen |",
        "|---|---|---|",
    ]
    for row in runs:
        sweep = row["sweep"]
        cells = []
        added = {extension["lr"] for extension in sweep.get("added", [])}
        diverged = set(sweep.get("diverged", []))
        for lr in sweep["learning_rates"]:
            perplexity = sweep["dev_perplexity"][repr(lr)]
            text = ("+" if lr in added else "") + f"{lr:g}: " + (f"{perplexity:.3f}" if perplexity is not None else "-")
            text += " (diverged)" if lr in diverged else ""
            cells.append(f"**{text}**" if lr == sweep["chosen_lr"] else text)
        chosen = f"{sweep['chosen_lr']:g}" + (
            f" (**at the grid's edge after {len(added)} added rate(s), the bound: widen the grid**)"
            if sweep["at_edge"]
            else ""
        )
        lines.append(f"| {row['name']} | {'; '.join(cells)} | {chosen} |")
    return "\n".join(lines) + "\n"


def format_budget_check(report: dict[str, Any]) -> str:
    runs = [row for row in report["rows"] if row["method"] != "base"]
    reference = report["reference_run"] or (runs[0]["name"] if runs else None)
    differing = {key for row in runs for key in row["budget_differences"]}
    lines = [
        "## Same-budget check",
        "",
        f"Each training is compared with {reference}'s training of the same seed (the same data order)"
        + (
            ", or on another share of the training data with the full fine-tuning run on that share."
            if any(row.get("reference") not in (None, reference) for row in runs)
            else "."
        ),
    ]
    agree = [key for key in report["budget_fields"] if key not in differing]
    if agree:
        lines.append(f"Every run shares with {reference}: {', '.join(agree)}.")
    for key in report["budget_fields"]:
        if key in differing:
            values = ", ".join(
                f"{row['name']}: {row['budget_differences'][key]}" for row in runs if key in row["budget_differences"]
            )
            lines.append(
                f"**{key} differs** ({values}); those runs are flagged in the table and are not a controlled "
                "comparison."
            )
    other_data = [row["name"] for row in runs if row.get("trained_on_other_data")]
    if other_data:
        lines.append(f"**Trained on other data than the dataset evaluated:** {', '.join(other_data)}.")
    learning_rates = ", ".join(f"{row['name']} {row['lr']:g}" for row in runs)
    lines.append(f"The learning rate differs by design: each run's is chosen on the dev split ({learning_rates}).")
    return "\n".join(lines) + "\n"


def format_intervals(report: dict[str, Any]) -> str:
    rows = [row for row in report["rows"] if row["method"] != "base"]
    test_covers = rows[0]["test"]["covers"] if rows else ""
    ratio = next((row["vs_reference"] for row in rows if "vs_reference" in row), None)
    forgetting = next((row["forgetting"] for row in rows if "forgetting" in row), None)
    parts = [
        f"**Intervals.** {report['confidence']:.0%} percentile bootstrap ({report['bootstrap_resamples']:,} resamples) "
        "that resamples whole conversation trees (all responses of a tree together, since they share a prompt and "
        f"context), and seeds: test perplexity over {test_covers}."
    ]
    if ratio:
        parts.append(
            "Ratios: computed seed by seed against the reference trained on the same seed, combined as a geometric "
            f"mean; the interval covers {ratio['covers']}."
        )
    if forgetting:
        parts.append(
            "Forgetting: the change in NLL per token on the general text from the base model (exp of it is the "
            f"perplexity ratio to the base; positive means worse), its interval over {forgetting['covers']}."
        )
    parts.append(
        "Costs are means over seeds. Peak memory: GPU memory allocated by tensors on CUDA, else the training process's "
        "peak resident set size."
    )
    return " ".join(parts) + "\n"


def format_results_markdown(report: dict[str, Any], protocol: str, figure_paths: Sequence[Path]) -> str:
    parts = [
        "# Study results",
        "",
        protocol,
        "",
        format_study_table(report),
        format_intervals(report),
        format_sweep_table(report),
        format_falling_behind(report),
        format_budget_check(report),
    ]
    parts += [f"![{figure.stem}]({figure.name})" for figure in figure_paths]
    return "\n".join(part for part in parts if part is not None) + "\n"


def replace_marked_block(text: str, block: str, where: str) -> str:
    """Replace what lies between the results markers; every byte outside them stays as it was."""
    start = text.find(README_START)
    end = text.find(README_END, start + len(README_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise UserError(
            f"{where} has no '{README_START}' ... '{README_END}' block; add those two lines where the "
            "results should go, or pass --no-readme."
        )
    return text[: start + len(README_START)] + "\n" + block.strip("\n") + "\n" + text[end:]


# ---------------------------------------------------------------------------------------------------------------------
# Writing it
# ---------------------------------------------------------------------------------------------------------------------


def draw_figures(
    report: dict[str, Any], study: Study, chosen: dict[str, list[Training]], results_dir: Path
) -> list[Path]:
    rows = [row for row in report["rows"] if row["method"] != "base"]
    logs = {spec.name: read_run_log(Path(chosen[spec.name][0].config.output_dir) / RUN_LOG) for spec in study.runs}
    paths = [
        figures.plot_loss_curves(logs, results_dir / "loss_curves.png"),
        figures.plot_perplexity_vs_params(report["rows"], results_dir / "perplexity_vs_params.png"),
    ]
    sweeps = {
        row["name"]: [(lr, row["sweep"]["dev_perplexity"][repr(lr)]) for lr in row["sweep"]["learning_rates"]]
        for row in rows
        if len(row["sweep"]["learning_rates"]) > 1
    }
    if sweeps:
        paths.append(
            figures.plot_dev_perplexity_vs_lr(
                sweeps,
                {name: next(r["lr"] for r in rows if r["name"] == name) for name in sweeps},
                results_dir / "dev_perplexity_vs_lr.png",
                added={row["name"]: [e["lr"] for e in row["sweep"].get("added", [])] for row in rows},
                at_edge={row["name"] for row in rows if row["sweep"]["at_edge"]},
            )
        )
    if any("forgetting" in row for row in rows):
        points = [
            {
                "name": row["name"],
                "test_perplexity": row["test"]["mean_perplexity"],
                "test_perplexity_std": row["test"]["seed_std"],
                "forgetting": row["forgetting"]["change"],
                "forgetting_std": row["forgetting"]["seed_std"],
            }
            for row in rows
        ]
        paths.append(figures.plot_learn_forget(points, results_dir / "learn_forget.png"))
    cost_points = [
        {
            "name": row["name"],
            "test_perplexity": row["test"]["mean_perplexity"],
            "peak_memory_bytes": row["peak_memory_bytes"],
            "wall_time_seconds": row["wall_time_seconds"],
            "train_flops": row["train_flops"],
        }
        for row in rows
    ]
    paths.append(figures.plot_cost_vs_quality(cost_points, results_dir / "cost_vs_quality.png"))
    return paths


def pareto_runs(report: dict[str, Any], cost: str) -> list[str]:
    rows = [row for row in report["rows"] if row["method"] != "base"]
    return [
        rows[index]["name"]
        for index in pareto_front([row[cost] for row in rows], [row["test"]["mean_perplexity"] for row in rows])
    ]


def write_report(study: Study, sweeps: dict[str, Any], training_fingerprint: str) -> dict[str, Any]:
    """results.json, results.md, the figures and samples.md, all in the study's results directory."""
    results_dir = study.results_dir
    chosen = {spec.name: study.replicate_trainings(spec, sweeps[spec.name].chosen_lr) for spec in study.runs}
    records = {}
    for spec in study.runs:
        for lr in sweeps[spec.name].learning_rates:
            for seed in study.seeds:
                training = study.training(spec, lr, seed)
                if (Path(training.config.output_dir) / "run.json").exists():
                    records[training.name] = load_run_record(Path(training.config.output_dir))
    eval_rows = read_json(results_dir / "perplexity.json", "run the study again: it evaluates again", expect=list)
    built = build_report(
        study,
        {name: sweep.to_dict() for name, sweep in sweeps.items()},
        eval_rows,
        load_per_response(results_dir / "per_response_nll.npz"),
        chosen,
        records,
    )
    built["pareto_front"] = {
        cost: pareto_runs(built, cost) for cost in ("peak_memory_bytes", "wall_time_seconds", "train_flops")
    }
    built["learning_curves"] = learning_curves(study, chosen)
    built["data_size"] = data_size_gaps(study, chosen, records, load_per_response(results_dir / "per_response_nll.npz"))
    meta = read_json(study.data_dir / META_FILE, "run the study again: it prepares the data again")
    figure_paths = draw_figures(built, study, chosen, results_dir) + draw_falling_behind_figures(built, results_dir)
    protocol = protocol_paragraph(
        study, meta, chosen, records, any(row.get("budget_differences") for row in built["rows"])
    )
    results = {
        "study": study.name,
        "study_file": str(study.source),
        "study_config": study.settings,
        "study_overrides": study.overrides,
        "code_version": code_version(),
        "resolved_configs": {t.name: config_to_dict(t.config) for trainings in chosen.values() for t in trainings},
        "protocol": protocol,
        "data": {
            key: meta.get(key)
            for key in ("source", "split_method", "seq_len", "lang", "sequences", "tokens", "fingerprint")
        },
        **built,
        "figures": [str(path) for path in figure_paths],
    }
    atomic_write_json(results_dir / "results.json", results)
    atomic_write_text(results_dir / "results.md", format_results_markdown(built, protocol, figure_paths))
    write_samples(study, {spec.name: Path(chosen[spec.name][0].config.output_dir) for spec in study.runs})
    print(format_study_table(built))
    print(format_budget_check(built))
    print(
        f"wrote {results_dir / 'results.json'}, results.md, samples.md, {', '.join(path.name for path in figure_paths)}"
    )
    return results


# How the protocol paragraph names each --optimizer.
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "paged-adamw8bit": "paged 8-bit AdamW"}


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


def update_readme(study: Study) -> bool:
    """Rewrite the README's results block (protocol + table); True when its text changed."""
    readme = Path(study.readme)
    if not readme.is_file():
        raise UserError(f"README {readme} does not exist; pass --readme PATH or --no-readme.")
    results = read_json(study.results_dir / "results.json", "run the study again: it reports again")
    link = os.path.relpath(study.results_dir / "results.md", readme.parent)
    block = (
        f"{results['protocol']}\n\n{format_study_table(results)}\n{format_intervals(results)}\n"
        f"Sweeps, the same-budget check, figures and samples: [{link}]({link}).\n"
    )
    text = readme.read_text(encoding="utf-8")
    updated = replace_marked_block(text, block, str(readme))
    if updated == text:
        return False
    atomic_write_text(readme, updated)
    print(f"rewrote the results block of {readme}")
    return True
