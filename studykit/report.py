"""The study's report, written: results.json (comparison's rows), results.md (report_markdown), the figures,
samples.md and the README's results block, all read from what the stages wrote. The analysis (analysis.py) puts its
verdict at the top of results.md afterwards, between markers of its own (analysis_markdown.insert_into_results).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from studykit import figures
from studykit.comparison import Comparison, budget_differences, build_comparison
from studykit.config import config_to_dict
from studykit.data import META_FILE
from studykit.errors import UserError
from studykit.falling_behind import data_size_gaps, draw_falling_behind_figures, learning_curves
from studykit.io import atomic_write_json, atomic_write_text, read_json
from studykit.report_markdown import (
    format_budget_check,
    format_interval,
    format_readme_block,
    format_results_markdown,
    format_study_table,
    protocol_paragraph,
)
from studykit.response_scores import PER_RESPONSE_FILE, load_per_response
from studykit.run_dir import RUN_LOG, RUN_RECORD, load_run_record, read_run_log
from studykit.runtime import code_version
from studykit.samples import write_samples
from studykit.study_file import Study, Training

# Names that moved to comparison, report_markdown and response_scores stay importable from here.
__all__ = ["budget_differences", "format_interval", "load_per_response", "update_readme", "write_report"]

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


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


def draw_figures(
    comparison: Comparison, study: Study, chosen: dict[str, list[Training]], results_dir: Path
) -> list[Path]:
    runs = comparison.runs
    logs = {spec.name: read_run_log(Path(chosen[spec.name][0].config.output_dir) / RUN_LOG) for spec in study.runs}
    paths = [
        figures.plot_loss_curves(logs, results_dir / "loss_curves.png"),
        figures.plot_perplexity_vs_params(comparison.to_dict()["rows"], results_dir / "perplexity_vs_params.png"),
    ]
    swept = [row for row in runs if len(row.sweep.learning_rates) > 1]
    if swept:
        paths.append(
            figures.plot_dev_perplexity_vs_lr(
                {
                    row.name: [(lr, row.sweep.dev_perplexity[repr(lr)]) for lr in row.sweep.learning_rates]
                    for row in swept
                },
                {row.name: row.lr for row in swept},
                results_dir / "dev_perplexity_vs_lr.png",
                added={row.name: [extension["lr"] for extension in row.sweep.added] for row in swept},
                at_edge={row.name for row in swept if row.sweep.at_edge},
            )
        )
    if any(row.forgetting for row in runs):
        points = [
            {
                "name": row.name,
                "test_perplexity": row.test.mean_perplexity,
                "test_perplexity_std": row.test.seed_std,
                "forgetting": row.forgetting.change,
                "forgetting_std": row.forgetting.seed_std,
            }
            for row in runs
        ]
        paths.append(figures.plot_learn_forget(points, results_dir / "learn_forget.png"))
    cost_points = [
        {
            "name": row.name,
            "test_perplexity": row.test.mean_perplexity,
            "peak_memory_bytes": row.peak_memory_bytes,
            "wall_time_seconds": row.wall_time_seconds,
            "train_flops": row.train_flops,
        }
        for row in runs
    ]
    paths.append(figures.plot_cost_vs_quality(cost_points, results_dir / "cost_vs_quality.png"))
    return paths


def write_report(study: Study, sweeps: dict[str, Any], training_fingerprint: str) -> dict[str, Any]:
    """results.json, results.md, the figures and samples.md, all in the study's results directory."""
    results_dir = study.results_dir
    chosen = {spec.name: study.replicate_trainings(spec, sweeps[spec.name].chosen_lr) for spec in study.runs}
    records = {}
    for spec in study.runs:
        for lr in sweeps[spec.name].learning_rates:
            for seed in study.seeds:
                training = study.training(spec, lr, seed)
                if (Path(training.config.output_dir) / RUN_RECORD).exists():
                    records[training.name] = load_run_record(Path(training.config.output_dir))
    per_response = load_per_response(results_dir / PER_RESPONSE_FILE)
    eval_rows = read_json(results_dir / "perplexity.json", "run the study again: it evaluates again", expect=list)
    comparison = build_comparison(
        study,
        {name: sweep.to_dict() for name, sweep in sweeps.items()},
        eval_rows,
        per_response,
        chosen,
        records,
    )
    comparison.learning_curves = learning_curves(study, chosen)
    comparison.data_size = data_size_gaps(study, chosen, records, per_response)
    meta = read_json(study.data_dir / META_FILE, "run the study again: it prepares the data again")
    figure_paths = draw_figures(comparison, study, chosen, results_dir) + draw_falling_behind_figures(
        comparison.learning_curves, comparison.data_size, results_dir
    )
    protocol = protocol_paragraph(study, meta, chosen, records, any(row.budget_differences for row in comparison.runs))
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
        **comparison.to_dict(),
        "figures": [str(path) for path in figure_paths],
    }
    atomic_write_json(results_dir / "results.json", results)
    markdown = format_results_markdown(comparison, protocol, figure_paths)
    atomic_write_text(results_dir / "results.md", markdown)
    write_samples(study, {spec.name: Path(chosen[spec.name][0].config.output_dir) for spec in study.runs})
    print(format_study_table(comparison))
    print(format_budget_check(comparison))
    print(
        f"wrote {results_dir / 'results.json'}, results.md, samples.md, {', '.join(path.name for path in figure_paths)}"
    )
    return results


def update_readme(study: Study) -> bool:
    """Rewrite the README's results block (protocol + table); True when its text changed."""
    readme = Path(study.readme)
    if not readme.is_file():
        raise UserError(f"README {readme} does not exist; pass --readme PATH or --no-readme.")
    results = read_json(study.results_dir / "results.json", "run the study again: it reports again")
    link = os.path.relpath(study.results_dir / "results.md", readme.parent)
    block = format_readme_block(Comparison.from_dict(results), results["protocol"], link)
    text = readme.read_text(encoding="utf-8")
    updated = replace_marked_block(text, block, str(readme))
    if updated == text:
        return False
    atomic_write_text(readme, updated)
    print(f"rewrote the results block of {readme}")
    return True
