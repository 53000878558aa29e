"""The whole controlled study from one TOML file: prepare -> every training run -> evaluation -> report.

study_file.py reads the file, study_state.py decides what is current, report.py and samples.py write the report; this
module runs the steps, each training in a process of its own.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit import locks
from studykit.checkpointing import UnusableCheckpoint
from studykit.config import StudyConfig, TrainConfig, build_parser, print_config
from studykit.errors import UserError, first_line
from studykit.io import MIB, disk_space_for
from studykit.methods import METHODS
from studykit.report import update_readme, write_report
from studykit.runtime import code_version
from studykit.safeguards import Interrupted
from studykit.study_file import RunSpec, Study, load_study, study_path
from studykit.study_state import (
    REPORT_INPUTS_FILE,
    STARTED_FILE,
    current_fingerprint,
    eval_inputs,
    is_current,
    mark_current,
    plan,
    prepare_inputs,
    report_inputs,
    resumable_study_run,
    run_inputs,
    tiny_model_inputs,
)

# results.json, results.md, samples.md and the figures, with room to spare.
REPORT_BYTES = 2 * MIB


def train_run(config: TrainConfig) -> dict[str, Any]:
    """One training run through the shared trainer, exactly as training/train_*.py would run it."""
    from studykit.trainer import train

    return train(config).to_dict()


def train_in_fresh_process(spec: RunSpec) -> dict[str, Any]:
    """Each run trains in its own process, so its peak memory (the process's RSS on a CPU) and its state are its
    own, not the high-water mark of the runs before it."""
    with ProcessPoolExecutor(max_workers=1, mp_context=training_process_context()) as pool:
        try:
            return pool.submit(train_run, spec.config).result()
        except Interrupted as stopped:
            # The trainer's advice (--resume) is for its own command; the study resumes by itself.
            error = UserError(f"{spec.name}: training stopped by {stopped.signal_name} after step {stopped.step} and saved a "
                              "resumable checkpoint; run the same study command again to continue it.")
            error.exit_code = stopped.exit_code
            raise error from None


def training_process_context():
    """forkserver where there is one: every run still gets a process of its own, forked from a server that imported
    torch and transformers once, so a run pays no import time; spawn elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["studykit.trainer"])
    return context


def train_study_run(spec: RunSpec, inputs: dict[str, Any], done: dict[str, Any]) -> None:
    """Train one run: continue an unfinished one made from the same inputs, else start afresh (replacing whatever
    the directory held, never mixing two runs)."""
    run_dir = Path(spec.config.output_dir)
    checkpoint = resumable_study_run(run_dir, inputs)
    if checkpoint is not None:
        print(f"\n=== training {spec.name}: resuming the unfinished run from {checkpoint.name} ===")
        try:
            train_in_fresh_process(dataclasses.replace(spec, config=dataclasses.replace(spec.config, resume=True)))
            done["resumed"].append(spec.name)
        except UnusableCheckpoint as error:
            print(f"warning: {spec.name} cannot be resumed ({error}); training it again from the start.")
            checkpoint = None
    if checkpoint is None:
        print(f"\n=== training {spec.name} ===")
        run_dir.mkdir(parents=True, exist_ok=True)
        # Written before the first step, so an interrupted run can later be recognised as this one and resumed.
        mark_current(run_dir, inputs, STARTED_FILE)
        train_in_fresh_process(dataclasses.replace(spec, config=dataclasses.replace(spec.config, overwrite=True)))
    mark_current(run_dir, inputs)
    done["trained"].append(spec.name)


def build_tiny_model(study: Study) -> None:
    from studykit.tiny import build_tiny_gpt2, sample_texts, train_byte_level_tokenizer

    spec = study.tiny_model
    tokenizer = train_byte_level_tokenizer(sample_texts(Path(spec.data_file)), spec.vocab_size)
    build_tiny_gpt2(Path(study.model), tokenizer, n_layer=spec.n_layer, n_embd=spec.n_embd)
    mark_current(Path(study.model), tiny_model_inputs(study))
    print(f"built tiny model {study.model}")


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run every step that is not current; return what was done (and what was kept)."""
    print_config(config)
    study = load_study(study_path(config), config.output_dir, config.readme)
    print(f"study '{study.name}' from {study.source} -> {study.output_dir} (code version {code_version()})")
    steps = plan(study)
    for step, action in steps:
        print(f"  {step:<24} {action}")
    done: dict[str, Any] = {"study": study.name, "output_dir": str(study.output_dir), "tiny_model_built": False, "prepared": False,
                            "trained": [], "resumed": [], "kept": [], "evaluated": False, "reported": False, "readme": None, "dry_run": config.dry_run}
    if config.dry_run:
        print_memory_plan(study)
        return done
    with locks.exclusive(study.output_dir, "--output-dir"):
        return run_steps(study, done)


def print_memory_plan(study: Study) -> None:
    """For a dry run: what each run needs on a GPU, from the base model's config alone (nothing is downloaded)."""
    from studykit.memory import plan_line, planning_config

    model_config = planning_config(study.model)
    if model_config is None:
        print(f"  {'memory':<24} not estimated: '{study.model}' is neither a GPT-2 size the kit knows nor a local model "
              "directory (yet)")
        return
    for spec in study.runs:
        print(f"  {'memory ' + spec.name:<24} {plan_line(spec.config, model_config, study.prepare.seq_len)}")


def run_steps(study: Study, done: dict[str, Any]) -> dict[str, Any]:
    check_extra_eval_reachable(study)
    check_runs_against_the_base_model(study)

    if study.tiny_model is not None and not is_current(Path(study.model), tiny_model_inputs(study), "config.json"):
        build_tiny_model(study)
        done["tiny_model_built"] = True
    fingerprint = current_fingerprint(study)
    if fingerprint is None:
        from studykit.prepare import prepare

        fingerprint = prepare(study.prepare)["fingerprint"]
        mark_current(study.data_dir, prepare_inputs(study))
        done["prepared"] = True

    for spec in study.runs:
        inputs = run_inputs(spec, fingerprint)
        run_dir = Path(spec.config.output_dir)
        if is_current(run_dir, inputs, "run.json"):
            done["kept"].append(spec.name)
            continue
        train_study_run(spec, inputs, done)

    warn_about_stale_runs(study)
    # A run trained now always gets scored, even one whose inputs match an earlier evaluation.
    evaluated = all(is_current(study.results_dir, eval_inputs(study, fingerprint), name) for name in ("perplexity.json", "per_response_nll.npz"))
    if done["trained"] or not evaluated:
        from studykit.evaluate import evaluate

        print("\n=== evaluating ===")
        evaluate(study.eval)
        mark_current(study.results_dir, eval_inputs(study, fingerprint))
        done["evaluated"] = True

    if done["evaluated"] or not is_current(study.results_dir, report_inputs(study, fingerprint), "results.json", REPORT_INPUTS_FILE):
        with disk_space_for(study.results_dir, REPORT_BYTES, "the report (results, figures, samples)",
                            "free some space and run the same study command again (the trained runs are kept)"):
            write_report(study)
        mark_current(study.results_dir, report_inputs(study, fingerprint), REPORT_INPUTS_FILE)
        done["reported"] = True
    if study.readme is not None:
        done["readme"] = str(study.readme) if update_readme(study) else None
    resumed = f" (resumed {done['resumed']})" if done["resumed"] else ""
    print(f"\ndone: trained {done['trained'] or 'nothing'}{resumed}, kept {done['kept'] or 'nothing'}, "
          f"evaluated: {done['evaluated']}, report: {study.results_dir / 'results.md'}")
    return done


def check_extra_eval_reachable(study: Study) -> None:
    """A hub set for --extra-eval is checked before any training, not hours later at evaluation."""
    extra = study.eval.extra_eval
    if extra and not Path(extra).exists():
        from studykit.hub import ensure_hub_reachable

        ensure_hub_reachable(extra.partition(":")[0], "a local text file as [eval] extra_eval", repo_type="dataset")


def base_model_config(study: Study):
    """The base model's config, all that matching LoRA targets needs: nothing else is read, nothing written; the tiny
    model is described by its [tiny_model] table, not yet built."""
    from transformers import AutoConfig, GPT2Config

    from studykit.hub import ensure_hub_reachable

    if study.tiny_model is not None:
        # The layer count and width make the module names; heads and vocabulary change none, so one head always fits.
        return GPT2Config(n_layer=study.tiny_model.n_layer, n_embd=study.tiny_model.n_embd, n_head=1)
    ensure_hub_reachable(study.model, "a local model directory as [budget] model")
    try:
        return AutoConfig.from_pretrained(study.model, trust_remote_code=study.runs[0].config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read a model config from '{study.model}' ({first_line(error)}); set [budget] model to a model "
                        "directory or hub id (and trust_remote_code = true for a model with its own code).") from None


def check_runs_against_the_base_model(study: Study) -> None:
    """Every run's settings that depend on the base model's modules (LoRA's target modules) are checked against it
    before the first run trains, the way its training will check them, so a run that cannot start is found before
    the runs ahead of it spend their time."""
    import torch
    from transformers import AutoModelForCausalLM

    base_config = None
    for spec in study.runs:
        check = METHODS[spec.method].check_on_skeleton
        if check is None:
            continue
        base_config = base_config or base_model_config(study)
        # Modules without weights (the meta device); a fresh one each time, as a check may change it in place.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=spec.config.trust_remote_code)
        try:
            check(skeleton, spec.config)
        except UserError as error:
            raise UserError(f"run '{spec.name}' in {study.source} cannot train: {error}") from None


def warn_about_stale_runs(study: Study) -> None:
    listed = {spec.name for spec in study.runs}
    if not study.checkpoints_dir.is_dir():
        return
    for path in sorted(study.checkpoints_dir.iterdir()):
        if path.is_dir() and path.name not in listed and not path.name.startswith("."):
            print(f"warning: {path} is not a run of this study; evaluation scores it but the report leaves it out. "
                  "Delete it to save the time.")


def parse_study_args(description: str, argv: Optional[Sequence[str]] = None) -> StudyConfig:
    parser = build_parser(StudyConfig, description)
    # --no-readme beside --readme PATH: an empty path means "leave every README alone".
    parser.add_argument("--no-readme", dest="readme", action="store_const", const="", help="do not rewrite any README")
    return StudyConfig(**vars(parser.parse_args(argv)))
