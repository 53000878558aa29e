"""The study's report: results.json, results.md, figures and samples from what the stages wrote; the same-budget check;
the README's results block."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from studykit import figures
from studykit.config import config_to_dict
from studykit.data import META_FILE
from studykit.errors import UserError, first_line
from studykit.evaluate import format_params
from studykit.io import DamagedFile, atomic_write_json, atomic_write_text, read_json
from studykit.run_dir import RUN_LOG, load_run_record, read_run_log
from studykit.run_state import RunRecord
from studykit.runtime import code_version
from studykit.samples import write_samples
from studykit.statistics import (
    CONFIDENCE,
    MIN_TEXTS_FOR_INTERVAL,
    paired_ratio,
    perplexity_interval,
)
from studykit.study_file import Study

# What two runs must share to be compared at all; each is recorded in the run's run.json. The learning rate is
# left out on purpose: it is the one setting the methods are expected to need differently. `kernels` (attention,
# MLP activation, loss) is there so both methods are computed alike, `optimizer` so both take the same kind of step
# (8-bit moments move the weights a little differently from fp32 ones).
BUDGET_FIELDS = ("data_fingerprint", "validation_fingerprint", "seq_len", "effective_batch", "steps", "seed", "kernels",
                 "optimizer")

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def budget_differences(records: dict[str, RunRecord], reference: str) -> dict[str, dict[str, Any]]:
    """For each run, the budget fields whose value differs from the reference run's: {run: {field: value}}."""
    expected = records[reference]
    return {name: {key: getattr(record, key) for key in BUDGET_FIELDS if getattr(record, key) != getattr(expected, key)}
            for name, record in records.items()}


def build_report(eval_rows: list[dict[str, Any]], per_response: dict[str, np.ndarray], run_records: dict[str, RunRecord],
                 resamples: int, seed: int) -> dict[str, Any]:
    """Rows for the base model and every run, with intervals, the paired comparison to full FT and the budget check."""
    rows_by_name = {row["name"]: row for row in eval_rows}
    missing = [name for name in run_records if name not in rows_by_name]
    if missing:
        raise UserError(f"the evaluation has no rows for run(s) {missing}; run the study again so it evaluates them.")
    full_runs = [name for name, record in run_records.items() if record.method == "full"]
    reference = full_runs[0] if full_runs else None
    differences = budget_differences(run_records, reference or next(iter(run_records))) if run_records else {}
    tokens = per_response[f"{eval_rows[0]['name']}/tokens"]
    names = (["base"] if "base" in rows_by_name else []) + list(run_records)
    rows = []
    for name in names:
        eval_row, record = rows_by_name[name], run_records.get(name)
        nll = per_response[f"{name}/nll"]
        interval = perplexity_interval(nll, tokens, resamples, seed)
        trainable = record.trainable_params if record else 0
        total = record.total_params if record else eval_row.get("total_params")
        row = {
            "name": name,
            "method": record.method if record else "base",
            "lr": record.lr if record else None,
            "lora": record.lora if record else None,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "perplexity": eval_row["perplexity"],
            "perplexity_ci": list(interval) if interval else None,
            "validation_tokens": eval_row["tokens"],
            "validation_responses": eval_row["responses"],
            "vs_full_ft": paired_ratio(nll, per_response[f"{reference}/nll"], tokens, resamples, seed) if reference and name != reference else None,
            "budget": {key: getattr(record, key) for key in BUDGET_FIELDS} if record else None,
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
            row.update({key: getattr(record, key) for key in ("steps", "tokens_seen", "wall_time_seconds", "tokens_per_second", "mfu",
                                                              "peak_memory_bytes", "peak_memory_kind", "checkpoint_bytes", "effective_batch",
                                                              "seed")})
        rows.append(row)
    return {"reference_run": reference, "budget_fields": list(BUDGET_FIELDS), "confidence": CONFIDENCE,
            "bootstrap_resamples": resamples, "rows": rows}


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


def replace_marked_block(text: str, block: str, where: str) -> str:
    """Replace what lies between the results markers; every byte outside them stays as it was."""
    start = text.find(README_START)
    end = text.find(README_END, start + len(README_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise UserError(f"{where} has no '{README_START}' ... '{README_END}' block; add those two lines where the "
                        "results should go, or pass --no-readme.")
    return text[: start + len(README_START)] + "\n" + block.strip("\n") + "\n" + text[end:]


def load_per_response(path: Path) -> dict[str, Any]:
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # what numpy's zip reader raises
        raise DamagedFile(path, first_line(error), "run the study again: it evaluates again") from None


def write_report(study: Study) -> dict[str, Any]:
    """results.json, results.md, the two figures and samples.md, all in the study's results directory."""
    results_dir = study.results_dir
    records = {spec.name: load_run_record(Path(spec.config.output_dir)) for spec in study.runs}
    eval_rows = read_json(results_dir / "perplexity.json", "run the study again: it evaluates again", expect=list)
    built = build_report(eval_rows, load_per_response(results_dir / "per_response_nll.npz"), records,
                         study.report.bootstrap_resamples, study.report.bootstrap_seed)
    meta = read_json(study.data_dir / META_FILE, "run the study again: it prepares the data again")
    logs = {spec.name: read_run_log(Path(spec.config.output_dir) / RUN_LOG) for spec in study.runs}
    figure_paths = [figures.plot_loss_curves(logs, results_dir / "loss_curves.png"),
                    figures.plot_perplexity_vs_params(built["rows"], results_dir / "perplexity_vs_params.png")]
    protocol = protocol_paragraph(study, meta, records, any(row["budget_differences"] for row in built["rows"]))
    results = {"study": study.name, "study_file": str(study.source), "study_config": study.settings, "code_version": code_version(),
               "resolved_configs": {spec.name: config_to_dict(spec.config) for spec in study.runs}, "protocol": protocol,
               "data": {key: meta.get(key) for key in ("source", "split_method", "seq_len", "lang", "sequences", "tokens", "fingerprint")},
               **built, "figures": [str(path) for path in figure_paths]}
    atomic_write_json(results_dir / "results.json", results)
    atomic_write_text(results_dir / "results.md", format_results_markdown(built, protocol, [str(path) for path in figure_paths]))
    write_samples(study)
    print(format_study_table(built))
    print(format_budget_check(built))
    print(f"wrote {results_dir / 'results.json'}, results.md, samples.md, {', '.join(path.name for path in figure_paths)}")
    return results


def protocol_paragraph(study: Study, meta: dict[str, Any], records: dict[str, RunRecord], budgets_differ: bool) -> str:
    first_name, first = next(iter(records.items()))
    budget = f"Budget of {first_name} (**runs flagged in the table differ from it**)" if budgets_differ else "Budget, the same for every run"
    config = first.config
    learning_rates = ", ".join(f"{name} {record.lr:g}" for name, record in records.items())
    return (
        f"**Protocol.** Data: {meta['source']} ({meta['split_method']}); assistant responses in language(s) {meta['lang']}, "
        f"not deleted, review passed, non-blank, tokenized with `{meta['tokenizer']}`, EOS appended, cut to {meta['seq_len']} tokens: "
        f"{meta['sequences']['train']:,} training and {meta['sequences']['validation']:,} validation responses "
        f"(data fingerprint `{meta['fingerprint']}`). {budget}: {first.steps:,} optimizer steps of "
        f"{first.effective_batch} sequences ({config['batch_size']} x {config['grad_accum']} accumulation), "
        f"seed {first.seed}, AdamW with {config['warmup_ratio']:.0%} warmup then {config['lr_schedule']} decay, "
        f"precision {first.precision} on {first.device}; only the learning rate differs ({learning_rates}). "
        f"Perplexity is exp(total NLL / predicted tokens) over all validation responses, with "
        f"{CONFIDENCE:.0%} bootstrap intervals over responses. Study file `{study.source.name}`, code version `{code_version()}`."
    )


def update_readme(study: Study) -> bool:
    """Rewrite the README's results block (protocol + table); True when its text changed."""
    readme = Path(study.readme)
    if not readme.is_file():
        raise UserError(f"README {readme} does not exist; pass --readme PATH or --no-readme.")
    results = read_json(study.results_dir / "results.json", "run the study again: it reports again")
    link = os.path.relpath(study.results_dir / "results.md", readme.parent)
    block = (f"{results['protocol']}\n\n{format_study_table(results)}\n"
             f"Intervals, the same-budget check, loss curves and samples: [{link}]({link}).\n")
    text = readme.read_text(encoding="utf-8")
    updated = replace_marked_block(text, block, str(readme))
    if updated == text:
        return False
    atomic_write_text(readme, updated)
    print(f"rewrote the results block of {readme}")
    return True
