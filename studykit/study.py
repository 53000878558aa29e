"""The whole controlled study from one TOML file: prepare -> every training run -> evaluation -> report.

study_file.py reads the file, study_state.py decides what is current and what the sweeps chose, study_launch.py runs
the trainings (one at a time, side by side on GPUs, under accelerate, or printed as commands), report.py and samples.py
write the report; this module runs the steps in order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit import locks
from studykit.analysis import run_analysis
from studykit.config import build_parser, check_ranges, field_values, print_config
from studykit.errors import UserError
from studykit.hub_upload import push_study
from studykit.io import MIB, disk_space_for
from studykit.methods import METHODS
from studykit.modeling import model_context_length, model_skeleton
from studykit.report import update_readme, write_report
from studykit.runtime import code_version, refuse_slow_cpu_run
from studykit.study_config import StudyConfig
from studykit.study_file import Study, Training, load_study, study_path, with_launcher_table
from studykit.study_launch import print_commands, run_trainings
from studykit.study_plan import (
    base_model_config,
    base_model_parameters,
    pending_work,
    print_memory_plan,
    time_estimate,
)
from studykit.study_state import (
    REPORT_INPUTS_FILE,
    SweepResult,
    current_data,
    eval_inputs,
    is_current,
    mark_current,
    plan,
    prepare_inputs,
    report_inputs,
    sweep_result,
    tiny_model_inputs,
    training_diverged,
    training_inputs,
    training_is_current,
)
from studykit.study_submitit import run_as_jobs, trains_elsewhere

# results.json, results.md, samples.md and the figures, with room to spare.
REPORT_BYTES = 2 * MIB


def build_tiny_model(study: Study) -> None:
    import torch

    from studykit.tiny import build_from_config

    spec = study.tiny_model
    # One thread: the same weights on every machine (another thread count sums in another order), and on a busy
    # 2-core machine no slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        note = build_from_config(Path(study.model), spec)
    finally:
        torch.set_num_threads(threads)
    mark_current(Path(study.model), tiny_model_inputs(study))
    scored = (
        f"; held-out perplexity {note.heldout_perplexity_before:.1f} -> {note.heldout_perplexity_after:.1f}"
        if note.heldout_perplexity_after is not None
        else ""
    )
    print(f"built tiny model {study.model}: {note.note}{scored}")


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run every step that is not current; return what was done (and what was kept)."""
    print_config(config)
    study = load_study(study_path(config), config.output_dir, config.readme, config.seeds, config.overrides)
    for spec in study.runs:
        spec.config = dataclasses.replace(spec.config, device=config.device)
    config = with_launcher_table(config, study)
    changed = f" with --set {' '.join(study.overrides)}" if study.overrides else ""
    print(f"study '{study.name}' from {study.source}{changed} -> {study.output_dir} (code version {code_version()})")
    for step, action in plan(study):
        print(f"  {step:<24} {action}")
    done: dict[str, Any] = {
        "study": study.name,
        "output_dir": str(study.output_dir),
        "tiny_model_built": False,
        "prepared": False,
        "trained": [],
        "resumed": [],
        "kept": [],
        "chosen": {},
        "evaluated": False,
        "reported": False,
        "analyzed": False,
        "readme": None,
        "dry_run": config.dry_run,
        "pending": [],
        "pushed": [],
        "diverged": [],
    }
    if config.dry_run:
        print_memory_plan(study)
        for line in time_estimate(study, config.assume_tflops):
            print(line)
        return done
    with locks.exclusive(study.output_dir, "--output-dir"):
        return run_steps(study, config, done)


def run_steps(study: Study, config: StudyConfig, done: dict[str, Any]) -> dict[str, Any]:
    check_extra_eval_reachable(study)
    check_runs_against_the_base_model(study)
    if not config.print_commands and not trains_elsewhere(config):
        refuse_slow_cpu_run(
            config.device,
            f"the study's pending trainings of {study.model}",
            lambda: (base_model_parameters(study), pending_work(study, current_data(study)).flops),
        )
    if study.tiny_model is not None and not is_current(Path(study.model), tiny_model_inputs(study), "config.json"):
        build_tiny_model(study)
        done["tiny_model_built"] = True
    meta = current_data(study)
    if meta is None:
        from studykit.prepare import prepare

        meta = prepare(study.prepare)
        mark_current(study.data_dir, prepare_inputs(study))
        done["prepared"] = True
    fingerprint = meta["training_fingerprint"]

    # The sweep (every rate, the sweep seeds), widened where a choice lands at an end of its grid, then the chosen rate
    # with every seed: a choice reads dev losses only.
    sweeps = sweep_phases(study, config, fingerprint, done)
    if sweeps is None:
        return done
    for sweep in sweeps.values():
        done["chosen"][sweep.run] = sweep.chosen_lr
        if sweep.at_edge:
            print(
                f"warning: run '{sweep.run}' chose lr {sweep.chosen_lr:g}, at the edge of its grid "
                f"{sweep.learning_rates} after {len(sweep.added)} added rate(s), the most [budget] grid_extensions "
                "allows; the best rate may lie beyond it: widen the grid or raise grid_extensions."
            )
    chosen = [t for spec in study.runs for t in study.replicate_trainings(spec, sweeps[spec.name].chosen_lr)]
    if not train_phase(study, config, chosen, fingerprint, done):
        return done

    warn_about_stale_runs(
        study,
        {t.name for spec in study.runs for t in study.sweep_trainings(spec, sweeps[spec.name].learning_rates)}
        | {t.name for t in chosen},
    )
    evaluation = eval_inputs(study, meta["fingerprint"], chosen, fingerprint)
    evaluated = all(
        is_current(study.results_dir, evaluation, name) for name in ("perplexity.json", "per_response_nll.npz")
    )
    # A training trained now always gets scored, even one whose inputs match an earlier evaluation.
    if done["trained"] or not evaluated:
        from studykit.evaluate import evaluate

        print("\n=== evaluating the chosen trainings on the test split ===")
        evaluate(dataclasses.replace(study.eval, runs=[training.name for training in chosen]))
        mark_current(study.results_dir, evaluation)
        done["evaluated"] = True
    inputs = report_inputs(study, evaluation, {name: sweep.to_dict() for name, sweep in sweeps.items()})
    if done["evaluated"] or not is_current(study.results_dir, inputs, "results.json", REPORT_INPUTS_FILE):
        with disk_space_for(
            study.results_dir,
            REPORT_BYTES,
            "the report (results, figures, samples)",
            "free some space and run the same study command again (the trained runs are kept)",
        ):
            write_report(study, sweeps, fingerprint)
        mark_current(study.results_dir, inputs, REPORT_INPUTS_FILE)
        done["reported"] = True
    if study.analysis.enabled:
        # After the report, whose rewrite of results.md the analysis's verdict block then goes back into.
        done["analyzed"] = run_analysis(study, sweeps, fingerprint, meta["seq_len"])
    if study.readme is not None:
        done["readme"] = str(study.readme) if update_readme(study) else None
    if config.push_to_hub:
        # Last: an upload that fails leaves every result in place, and the sentence says how to upload it by hand.
        done["pushed"] = push_study(
            config.push_to_hub, {t.name: Path(t.config.output_dir) for t in chosen}, study.results_dir
        )
    resumed = f" ({len(done['resumed'])} resumed)" if done["resumed"] else ""
    print(
        f"\ndone: trained {len(done['trained'])} training(s){resumed}, kept {len(done['kept'])}, evaluated: "
        f"{done['evaluated']}, report: {study.results_dir / 'results.md'}"
    )
    return done


def sweep_phases(
    study: Study, config: StudyConfig, fingerprint: str, done: dict[str, Any]
) -> Optional[dict[str, SweepResult]]:
    """Train every run's sweep, then each rate added beyond a grid's end, until every run has chosen; None when the
    trainings were printed as commands instead. A sweep training that diverges counts as its grid's worst rate; a run
    of one fixed rate has no other rate to fall back on, so its diverging training is an error as it always was."""
    grids = {spec.name for spec in study.runs if spec.sweeps}
    while True:
        sweeps = {spec.name: sweep_result(study, spec, fingerprint) for spec in study.runs}
        pending = [
            training
            for spec in study.runs
            for training in study.sweep_trainings(spec, sweeps[spec.name].learning_rates)
            if training.name in sweeps[spec.name].pending
        ]
        for sweep in sweeps.values():
            for extension in sweep.added:
                if any(t.lr == extension.lr and t.run == sweep.run for t in pending):
                    print(f"run '{sweep.run}': adding lr {extension.lr:g}: {extension.reason}")
        if not pending:
            for spec in study.runs:
                for training in study.sweep_trainings(spec, sweeps[spec.name].learning_rates):
                    if training.name not in done["kept"] + done["trained"]:
                        done["kept"].append(training.name)
            return sweeps
        fixed = [training for training in pending if training.run not in grids]
        swept = [training for training in pending if training.run in grids]
        if fixed and not train_phase(study, config, fixed, fingerprint, done):
            return None
        if swept and not train_phase(study, config, swept, fingerprint, done, divergence_allowed=True):
            return None


def train_phase(
    study: Study,
    config: StudyConfig,
    trainings: list[Training],
    fingerprint: str,
    done: dict[str, Any],
    divergence_allowed: bool = False,
) -> bool:
    """Train what is not current of one phase; False when they were printed as commands instead (nothing more to do
    until they have run). With `divergence_allowed` (a sweep) a training that diverges is done: its rate is the
    worst."""
    pending = []
    for training in trainings:
        if not training_is_current(training, fingerprint) and not (
            divergence_allowed and training_diverged(training, fingerprint)
        ):
            pending.append(training)
        elif training.name not in done["kept"] + done["trained"]:
            done["kept"].append(training.name)
    if not pending:
        return True
    if config.print_commands:
        print_commands(pending, fingerprint, config)
        done["pending"] = [training.name for training in pending]
        return False
    run = run_as_jobs if config.launcher == "submitit" else run_trainings
    for name, resumed in run(pending, fingerprint, config, divergence_allowed).items():
        training = next(t for t in pending if t.name == name)
        done["trained"].append(name)
        if training_diverged(training, fingerprint):
            done["diverged"].append(name)
            continue
        mark_current(Path(training.config.output_dir), training_inputs(training, fingerprint))
        if resumed:
            done["resumed"].append(name)
    return True


def check_extra_eval_reachable(study: Study) -> None:
    """A hub set for --extra-eval is checked before any training, not hours later at evaluation."""
    extra = study.eval.extra_eval
    if extra and not Path(extra).exists():
        from studykit.hub import ensure_hub_reachable

        ensure_hub_reachable(extra.partition(":")[0], "a local text file as [eval] extra_eval", repo_type="dataset")


def check_runs_against_the_base_model(study: Study) -> None:
    """Every run's settings that depend on the base model's modules (LoRA's target modules) are checked against it
    before the first run trains, the way its training will check them, so a run that cannot start is found before
    the runs ahead of it spend their time."""
    base_config = None
    for spec in study.runs:
        check = METHODS[spec.method].check_on_skeleton
        if check is None:
            continue
        base_config = base_config or base_model_config(study)
        # Modules without weights (the meta device); a fresh one each time, as a check may change it in place.
        skeleton = model_skeleton(base_config, spec.config.trust_remote_code)
        try:
            check(skeleton, spec.config)
        except UserError as error:
            raise UserError(f"run '{spec.name}' in {study.source} cannot train: {error}") from None
    if study.report.sample_prompts:
        # samples.md continues a prompt by sample_new_tokens within the model's context; checked here, not after every
        # training has run.
        context = model_context_length(base_config or base_model_config(study))
        if study.report.sample_new_tokens >= context:
            raise UserError(
                f"[report] in {study.source} sets sample_new_tokens = {study.report.sample_new_tokens}, which leaves "
                f"no room for a prompt in the model's {context}-token context; set it below {context}."
            )


def warn_about_stale_runs(study: Study, listed: set[str]) -> None:
    """Directories of trainings the study no longer has (an edited grid, other seeds) take space and nothing else."""
    if not study.checkpoints_dir.is_dir():
        return
    for path in sorted(study.checkpoints_dir.iterdir()):
        if path.is_dir() and path.name not in listed and not path.name.startswith("."):
            print(
                f"warning: {path} is not a training of this study (as it now stands); the study ignores it: delete it "
                "to free the space."
            )


def parse_study_args(description: str, argv: Optional[Sequence[str]] = None) -> StudyConfig:
    parser = build_parser(StudyConfig, description)
    # --no-readme beside --readme PATH: an empty path means "leave every README alone".
    parser.add_argument("--no-readme", dest="readme", action="store_const", const="", help="do not rewrite any README")
    config = StudyConfig(**field_values(parser, argv))
    check_ranges(config)
    config.validate()
    return config
