"""The analysis stage: where and why each LoRA run falls short of full fine-tuning, and a verdict in words.

Runs after evaluation in every study (and alone: `studykit-analyze runs/default`). It reads the evaluation's
per-response scores, scores each chosen training once more token by token (analysis_parts), takes each training's
weight change apart, checks whether forgetting sits in the intruder dimensions, and writes results/analysis.json,
results/analysis.md, four figures, and the verdict at the top of results.md. Nothing here chooses anything: every
bucket edge comes from the training split or is fixed, the margin from the study file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit import analysis_figures, analysis_numbers
from studykit.analysis_markdown import format_analysis_markdown, insert_into_results, results_block, verdict_paragraph
from studykit.analysis_parts import (
    BASE,
    load_analysis_data,
    load_mitigation_part,
    load_token_part,
    load_weight_part,
    part_inputs,
    update_parts,
)
from studykit.config import config_to_dict, print_config, save_config
from studykit.dependency_logs import VERBOSE_FLAG, VERBOSE_HELP
from studykit.errors import UserError
from studykit.io import atomic_write_json, atomic_write_text, read_json
from studykit.methods import METHODS
from studykit.modeling import load_tokenizer
from studykit.response_scores import EXTRA_EVAL_PREFIX, load_per_response
from studykit.runtime import stage_code_version
from studykit.study_file import Study, Training, load_study
from studykit.study_state import current_data, digest, is_current, mark_current, sweep_result

ANALYSIS_INPUTS_FILE = "analysis_inputs.json"
EXCERPT_CHARACTERS = 200


def chosen_trainings(study: Study, sweeps: dict[str, Any]) -> dict[str, list[Training]]:
    """The full fine-tuning reference and every run of another method trained on the same share of the training data
    (--train-fraction): the analysis compares like with like. Runs on other shares, and other full fine-tuning runs,
    are compared with full FT on their own share in the report's gap by data size."""
    reference = reference_run(study)
    share = next((spec.config.train_fraction for spec in study.runs if spec.name == reference), None)
    return {
        spec.name: study.replicate_trainings(spec, sweeps[spec.name].chosen_lr)
        for spec in study.runs
        if spec.name == reference or (not METHODS[spec.method].reference and spec.config.train_fraction == share)
    }


def reference_run(study: Study) -> Optional[str]:
    return next((spec.name for spec in study.runs if METHODS[spec.method].reference), None)


def mitigated_trainings(study: Study, chosen: dict[str, list[Training]]) -> list[Training]:
    """The sweep seed's training of each LoRA run: the mitigation check costs a scoring pass per lambda."""
    first_seed = study.sweep_seeds[0]
    return [t for trainings in chosen.values() for t in trainings if t.method == "lora" and t.seed == first_seed]


def run_analysis(study: Study, sweeps: dict[str, Any], training_fingerprint: str, seq_len: int) -> bool:
    """Bring results/analysis.json and its figures up to date; True when anything was computed."""
    reference = reference_run(study)
    chosen = chosen_trainings(study, sweeps)
    results_dir = study.results_dir
    if reference is None or len(chosen) < 2:
        print("analysis: skipped: the study needs a full fine-tuning run and a run to compare with it.")
        return False
    print_config(study.analysis)
    started = time.perf_counter()
    data = load_analysis_data(study)
    mitigated = mitigated_trainings(study, chosen)
    computed = update_parts(study, data, chosen, mitigated, training_fingerprint, seq_len)
    parts_seconds = time.perf_counter() - started
    inputs = {
        "parts": {
            f"{name}.{kind}": digest(part_inputs(study, data, training, kind, training_fingerprint))
            for training in [None, *[t for ts in chosen.values() for t in ts]]
            for name in [BASE if training is None else training.name]
            for kind in ("tokens", "weights", "mitigation")
            if not (kind == "weights" and training is None) and not (kind == "mitigation" and training not in mitigated)
        },
        "evaluation": read_json(results_dir / "study_inputs.json").get("digest"),
        "report": config_to_dict(study.report),
        "analysis": config_to_dict(study.analysis),
        "runs": {name: [t.name for t in trainings] for name, trainings in chosen.items()},
        "code": stage_code_version("studykit.analysis"),
    }
    if not computed and is_current(results_dir, inputs, "analysis.json", ANALYSIS_INPUTS_FILE):
        insert_into_results(results_dir / "results.md", results_block(read_json(results_dir / "analysis.json")))
        return False
    analysis = build_analysis(study, data, chosen, reference, mitigated)
    analysis["verdict_paragraph"] = verdict_paragraph(analysis)
    analysis["seconds"] = {"parts": parts_seconds, "computed_parts": computed}
    figure_paths = draw_analysis_figures(study, analysis, chosen, reference)
    analysis["figures"] = {kind: str(path) for kind, path in figure_paths.items()}
    analysis["seconds"]["total"] = time.perf_counter() - started
    markdown = format_analysis_markdown(analysis, figure_paths)
    atomic_write_json(results_dir / "analysis.json", analysis)
    atomic_write_text(results_dir / "analysis.md", markdown)
    save_config(study.analysis, results_dir / "analysis_config.json")
    insert_into_results(results_dir / "results.md", results_block(analysis))
    mark_current(results_dir, inputs, ANALYSIS_INPUTS_FILE)
    print(analysis["verdict_paragraph"])
    print(f"wrote {results_dir / 'analysis.json'}, analysis.md and {len(figure_paths)} figures")
    return True


def build_analysis(
    study: Study, data, chosen: dict[str, list[Training]], reference: str, mitigated: list[Training]
) -> dict[str, Any]:
    report = study.report
    per_response = load_per_response(study.results_dir / "per_response_nll.npz")
    runs = {name: [t.name for t in trainings] for name, trainings in chosen.items()}
    methods = {spec.name: spec.method for spec in study.runs}
    ranks = {spec.name: getattr(spec.config, "rank", None) if spec.method == "lora" else None for spec in study.runs}
    verdicts = analysis_numbers.verdicts(
        per_response, runs, reference, report.equivalence_margin, report.bootstrap_resamples, report.bootstrap_seed
    )
    token_parts = {name: load_token_part(study, name) for name in [BASE, *[n for ns in runs.values() for n in ns]]}
    gaps = analysis_numbers.gap_by_bucket(
        token_parts, data.families, runs, reference, data.tree_ids, report.bootstrap_resamples, report.bootstrap_seed
    )
    weight_parts = {name: load_weight_part(study, name) for names in runs.values() for name in names}
    weights = analysis_numbers.weights_summary(weight_parts, runs, methods, ranks, reference)
    reference_training = next((t.name for t in chosen[reference] if t.seed == study.sweep_seeds[0]), None)
    mitigation = analysis_numbers.mitigation_curves(
        {t.name: load_mitigation_part(study, t.name) for t in mitigated},
        per_response,
        EXTRA_EVAL_PREFIX,
        reference_training,
    )
    mitigation["lambdas"] = list(study.analysis.mitigation_lambdas)
    worst = worst_with_text(study, data, per_response, runs, reference)
    kinds = analysis_numbers.rank_by_kind(weights[reference])
    return {
        "reference_run": reference,
        "verdict": {run: verdict.to_dict() for run, verdict in verdicts.items()},
        "verdict_paragraph": "",
        "gap_by_bucket": gaps,
        "largest_bucket": {
            run: dict(zip(("family", "bucket"), found))
            for run, gap in gaps.items()
            if (found := analysis_numbers.largest_gap_bucket(gap))
        },
        "most_concentrated_bucket": {
            run: dict(zip(("family", "bucket"), found))
            for run, gap in gaps.items()
            if (found := analysis_numbers.most_concentrated_bucket(gap))
        },
        "weights": weights,
        "rank_90_by_kind": {run: analysis_numbers.rank_by_kind(modules) for run, modules in weights.items()},
        "most_rank_kind": max(kinds, key=kinds.get) if kinds else None,
        "mitigation": mitigation,
        "worst_responses": worst,
        "settings": {
            "equivalence_margin": report.equivalence_margin,
            "bootstrap_resamples": report.bootstrap_resamples,
            "bootstrap_seed": report.bootstrap_seed,
            **config_to_dict(study.analysis),
        },
        "bucket_families": {family.name: family.labels for family in data.families},
        "test_responses": len(data.sequences),
        "test_trees": len(set(data.tree_ids)),
    }


def worst_with_text(study: Study, data, per_response, runs, reference) -> dict[str, list[dict[str, Any]]]:
    tokenizer = load_tokenizer(study.eval.tokenizer or study.model, "--tokenizer", study.eval.trust_remote_code)
    result = {}
    for run, names in runs.items():
        if run == reference:
            continue
        rows = analysis_numbers.worst_responses(per_response, names, runs[reference], study.analysis.worst_responses)
        for row in rows:
            index = row["index"]
            text = tokenizer.decode(data.sequences[index][data.prompt_lengths[index] :], skip_special_tokens=True)
            row["excerpt"] = " ".join(text.split())[:EXCERPT_CHARACTERS]
        result[run] = rows
    return result


def draw_analysis_figures(
    study: Study, analysis: dict[str, Any], chosen: dict[str, list[Training]], reference: str
) -> dict[str, Path]:
    results_dir = study.results_dir
    paths = {}
    if analysis["gap_by_bucket"]:
        paths["gap_by_bucket"] = analysis_figures.plot_gap_by_bucket(
            analysis["gap_by_bucket"], results_dir / "gap_by_bucket.png"
        )
    first_seed = study.sweep_seeds[0]
    spectra = {}
    for run, trainings in chosen.items():
        training = next((t for t in trainings if t.seed == first_seed), trainings[0])
        part = load_weight_part(study, training.name)
        spectra[run] = {
            kind: values
            for kind in analysis_figures.SPECTRUM_KINDS
            if (values := analysis_figures.layer_mean_spectrum(part, kind)) is not None
        }
    paths["spectra"] = analysis_figures.plot_spectra(spectra, results_dir / "weight_change_spectra.png")
    paths["rank_map"] = analysis_figures.plot_rank_map(analysis["weights"], results_dir / "weight_change_map.png")
    if analysis["mitigation"]["trainings"]:
        paths["mitigation"] = analysis_figures.plot_mitigation(analysis["mitigation"], results_dir / "mitigation.png")
    return paths


def analyze_study_directory(directory: str) -> bool:
    """`studykit-analyze DIR`: the analysis of a study whose report is written, from DIR/results/results.json."""
    results_path = Path(directory) / "results" / "results.json"
    if not results_path.is_file():
        raise UserError(
            f"{directory} holds no results/results.json; run the study first (python run_study.py ...) and pass its "
            "--output-dir."
        )
    results = read_json(results_path, "run the study again: it reports again")
    study = load_study(
        Path(results["study_file"]), str(directory), None, results.get("seeds"), results.get("study_overrides", [])
    )
    meta = current_data(study)
    if meta is None:
        raise UserError(f"the processed data of {directory} is not current; run the study again first.")
    sweeps = {spec.name: sweep_result(study, spec, meta["training_fingerprint"]) for spec in study.runs}
    pending = [name for name, sweep in sweeps.items() if sweep.chosen_lr is None]
    if pending:
        raise UserError(f"runs {pending} of {directory} have not finished their sweeps; run the study first.")
    return run_analysis(study, sweeps, meta["training_fingerprint"], meta["seq_len"])


def analyze_command(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    from studykit.errors import report_user_errors

    parser = argparse.ArgumentParser(
        description="Where and why LoRA falls short of full fine-tuning in a finished study: the test-NLL gap by token "
        "bucket, the weight change per module (spectra, effective rank, intruder dimensions), the intruder mitigation "
        "curve and a verdict per run; written to DIR/results/analysis.json, analysis.md and the top of results.md."
    )
    parser.add_argument("study_dir", help="the study's output directory, e.g. runs/default")
    # Read by the entry point before the parse (dependency_logs.quiet_dependencies).
    parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)
    arguments = parser.parse_args(argv if argv is not None else sys.argv[1:])
    report_user_errors(lambda: analyze_study_directory(arguments.study_dir))()


def analysis_estimate(
    study: Study, meta: Optional[dict[str, Any]], total_params: int, assumed_tflops: float
) -> Optional[str]:
    """For a dry run: the analysis's scoring passes (one over the test split per chosen training and the base; one
    over the test split and the general text per lambda and mitigated LoRA training), their model FLOPs at the
    assumed throughput, and at the evaluation's measured seconds per model where this study has been evaluated."""
    if not study.analysis.enabled:
        return None
    trainings = len(study.runs) * len(study.seeds)
    lora_runs = sum(spec.method == "lora" for spec in study.runs)
    test_passes = trainings + 1
    mitigation_passes = len(study.analysis.mitigation_lambdas) * lora_runs
    line = (
        f"analysis: {test_passes} token-scoring passes over the test split and {mitigation_passes} over the test split "
        "and the general text (mitigation), plus seconds of SVDs per training"
    )
    if meta is not None:
        extra = Path(study.eval.extra_eval) if study.eval.extra_eval else None
        # About 4 bytes of English per GPT-2 token; a hub dataset's size is not known before it is read.
        extra_tokens = extra.stat().st_size / 4 if extra is not None and extra.is_file() else 0
        tokens = test_passes * meta["tokens"]["test"] + mitigation_passes * (meta["tokens"]["test"] + extra_tokens)
        seconds = 2 * total_params * tokens / (assumed_tflops * 1e12)
        line += f": {format_duration(seconds)} at the assumed {assumed_tflops:g} model TFLOP/s"
    perplexity = study.results_dir / "perplexity.json"
    if perplexity.is_file():
        rows = read_json(perplexity, expect=list)
        per_model = sum(row["eval_seconds"] for row in rows) / max(len(rows), 1)
        line += (
            f"; {format_duration(per_model * (test_passes + mitigation_passes))} at this study's measured "
            f"{per_model:.1f} s of evaluation per model"
        )
    return line + " (less what is current)"


def format_duration(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )
