"""The whole controlled study from one TOML file: prepare -> every training run -> evaluation -> report.

study_file.py reads the file, study_state.py decides what is current and what the sweeps chose, study_launch.py runs
the trainings (one at a time, side by side on GPUs, under accelerate, or printed as commands), report.py and samples.py
write the report; this module runs the steps in order.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit import locks
from studykit.config import StudyConfig, TrainConfig, build_parser, check_ranges, field_values, print_config
from studykit.errors import UserError, first_line
from studykit.hub_upload import push_study
from studykit.io import MIB, disk_space_for
from studykit.methods import METHODS
from studykit.modeling import known_gpt2_config, model_context_length, model_skeleton
from studykit.report import update_readme, write_report
from studykit.runtime import code_version, refuse_slow_cpu_run
from studykit.study_file import Study, Training, load_study, study_path
from studykit.study_launch import print_commands, run_trainings
from studykit.study_state import (
    REPORT_INPUTS_FILE,
    current_data,
    eval_inputs,
    finished_record,
    is_current,
    mark_current,
    plan,
    prepare_inputs,
    report_inputs,
    sweep_result,
    tiny_model_inputs,
    training_inputs,
    training_is_current,
)

# results.json, results.md, samples.md and the figures, with room to spare.
REPORT_BYTES = 2 * MIB


def build_tiny_model(study: Study) -> None:
    import torch

    from studykit.tiny import build_pretrained_tiny_gpt2

    spec = study.tiny_model
    # One thread: the same weights on every machine (another thread count sums in another order), and on a busy
    # 2-core machine no slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        note = build_pretrained_tiny_gpt2(
            Path(study.model),
            Path(spec.data_file),
            Path(spec.general_text),
            spec.vocab_size,
            spec.n_layer,
            spec.n_embd,
            spec.pretrain_steps,
            block_size=spec.pretrain_block_size,
            lr=spec.pretrain_lr,
            seed=spec.seed,
            heldout_text_file=Path(spec.heldout_text) if spec.heldout_text else None,
        )
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
        "readme": None,
        "dry_run": config.dry_run,
        "pending": [],
        "pushed": [],
    }
    if config.dry_run:
        print_memory_plan(study)
        for line in time_estimate(study, config.assume_tflops):
            print(line)
        return done
    with locks.exclusive(study.output_dir, "--output-dir"):
        return run_steps(study, config, done)


def print_memory_plan(study: Study) -> None:
    """For a dry run: what each run needs on a GPU, from the base model's config alone (nothing is downloaded)."""
    from studykit.memory import plan_line, planning_config

    model_config = planning_config(study.model)
    if model_config is None:
        print(
            f"  {'memory':<24} not estimated: '{study.model}' is neither a GPT-2 size the kit knows nor a local model "
            "directory (yet)"
        )
        return
    for spec in study.runs:
        print(f"  {'memory ' + spec.name:<24} {plan_line(spec.config, model_config, study.prepare.seq_len)}")


def run_steps(study: Study, config: StudyConfig, done: dict[str, Any]) -> dict[str, Any]:
    check_extra_eval_reachable(study)
    check_runs_against_the_base_model(study)
    if not config.print_commands:
        refuse_slow_cpu_run(
            config.device,
            f"the study's pending trainings of {study.model}",
            lambda: (base_model_parameters(study), pending_work(study, current_data(study))[1]),
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

    # The sweep (every rate, the sweep seeds), then the chosen rate with every seed: a choice reads dev losses only.
    if not train_phase(
        study, config, [t for spec in study.runs for t in study.sweep_trainings(spec)], fingerprint, done
    ):
        return done
    sweeps = {spec.name: sweep_result(study, spec, fingerprint) for spec in study.runs}
    for sweep in sweeps.values():
        done["chosen"][sweep.run] = sweep.chosen_lr
        if sweep.at_edge:
            print(
                f"warning: run '{sweep.run}' chose lr {sweep.chosen_lr:g}, at the edge of its grid "
                f"{sweep.learning_rates}; the best rate may lie beyond it: widen the grid."
            )
    chosen = [t for spec in study.runs for t in study.replicate_trainings(spec, sweeps[spec.name].chosen_lr)]
    if not train_phase(study, config, chosen, fingerprint, done):
        return done

    warn_about_stale_runs(
        study,
        {training.name for spec in study.runs for training in study.sweep_trainings(spec)} | {t.name for t in chosen},
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


def train_phase(
    study: Study, config: StudyConfig, trainings: list[Training], fingerprint: str, done: dict[str, Any]
) -> bool:
    """Train what is not current of one phase; False when they were printed as commands instead (nothing more to do
    until they have run)."""
    pending = []
    for training in trainings:
        if not training_is_current(training, fingerprint):
            pending.append(training)
        elif training.name not in done["kept"] + done["trained"]:
            done["kept"].append(training.name)
    if not pending:
        return True
    if config.print_commands:
        print_commands(pending, fingerprint, config)
        done["pending"] = [training.name for training in pending]
        return False
    for name, resumed in run_trainings(pending, fingerprint, config).items():
        training = next(t for t in pending if t.name == name)
        mark_current(Path(training.config.output_dir), training_inputs(training, fingerprint))
        done["trained"].append(name)
        if resumed:
            done["resumed"].append(name)
    return True


def time_estimate(study: Study, assumed_tflops: float) -> list[str]:
    """How long the pending trainings take: model FLOPs per token x tokens x trainings, over an assumed sustained
    throughput, and over the throughput this study's finished trainings measured, where there are some."""
    meta = current_data(study)
    try:
        pending, flops, tokens, unknown = pending_work(study, meta)
    except UserError as error:
        return [f"estimate: not made, the base model's size is unknown here ({error})"]
    measured = measured_tokens_per_second(study, meta["training_fingerprint"] if meta else None)
    measured_seconds = sum(count / measured[method] for method, count in tokens.items() if method in measured)
    lines = [
        f"estimate: {pending} training(s) to run, {format_hours(flops / (assumed_tflops * 1e12))} at an assumed "
        f"{assumed_tflops:g} model TFLOP/s (--assume-tflops)"
        + (
            f"; {format_hours(measured_seconds)} at the tokens/s this study's finished "
            f"trainings measured ({', '.join(f'{m} {r:,.0f}' for m, r in measured.items())})"
            if measured
            else ""
        )
    ]
    if meta is None and not unknown:
        lines.append(
            "  (the data is not prepared yet: every sequence counted at full length, so this is an upper bound)"
        )
    if unknown:
        lines.append(
            f"  (runs {unknown} train for epochs over data not yet prepared, so their steps are unknown: prepare the "
            "data once, or give [budget] max_steps)"
        )
    return lines


def pending_work(study: Study, meta: Optional[dict[str, Any]]) -> tuple[int, float, dict[str, float], list[str]]:
    """The trainings still to run (a run not yet swept counts its grid with the sweep seeds and its first rate with the
    other seeds), their model FLOPs, their tokens by method, and the runs whose tokens cannot be known yet."""
    fingerprint = meta["training_fingerprint"] if meta else None
    total_params = base_model_parameters(study)
    pending_count, flops, tokens_by_method, unknown = 0, 0.0, {}, []
    for spec in study.runs:
        sweep = sweep_result(study, spec, fingerprint, adopt=False)
        trainings = study.sweep_trainings(spec)
        if sweep.chosen_lr is None:
            trainings += [
                study.training(spec, spec.learning_rates[0], seed)
                for seed in study.seeds
                if seed not in study.sweep_seeds
            ]
        else:
            trainings += study.replicate_trainings(spec, sweep.chosen_lr)
        pending = {
            t.name for t in trainings if fingerprint is None or not training_is_current(t, fingerprint, adopt=False)
        }
        tokens = training_tokens(spec.config, meta, study.prepare.seq_len)
        if tokens is None:
            unknown.append(spec.name)
            continue
        pending_count += len(pending)
        flops += METHODS[spec.method].flops_per_token(total_params) * tokens * len(pending)
        tokens_by_method[spec.method] = tokens_by_method.get(spec.method, 0) + tokens * len(pending)
    return pending_count, flops, tokens_by_method, unknown


def format_hours(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.0f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )


def training_tokens(config: TrainConfig, meta: Optional[dict[str, Any]], seq_len: int) -> Optional[int]:
    """Tokens one training steps through: exact with the prepared data; with max_steps alone, at most full-length
    sequences (an upper bound); unknown for an epoch budget over data not prepared yet."""
    if meta is not None:
        mean_length = meta["tokens"]["train"] / meta["sequences"]["train"]
        steps = config.max_steps or math.ceil(config.epochs * (meta["sequences"]["train"] // config.effective_batch))
        return int(steps * config.effective_batch * mean_length)
    if config.max_steps:
        return config.max_steps * config.effective_batch * seq_len
    return None


def measured_tokens_per_second(study: Study, fingerprint: Optional[str]) -> dict[str, float]:
    """The mean real tokens/s of this study's finished trainings, by method."""
    rates: dict[str, list[float]] = {}
    for spec in study.runs:
        for lr in spec.learning_rates:
            for seed in study.seeds:
                record = (
                    finished_record(study.training(spec, lr, seed), fingerprint, adopt=False) if fingerprint else None
                )
                if record is not None:
                    rates.setdefault(spec.method, []).append(record.tokens_per_second)
    return {method: sum(values) / len(values) for method, values in rates.items()}


def check_extra_eval_reachable(study: Study) -> None:
    """A hub set for --extra-eval is checked before any training, not hours later at evaluation."""
    extra = study.eval.extra_eval
    if extra and not Path(extra).exists():
        from studykit.hub import ensure_hub_reachable

        ensure_hub_reachable(extra.partition(":")[0], "a local text file as [eval] extra_eval", repo_type="dataset")


def base_model_parameters(study: Study) -> int:
    """The base model's parameter count, from its config alone (modules on the meta device, no weights)."""
    config = base_model_config(study, exact_shape=True)
    return sum(parameter.numel() for parameter in model_skeleton(config).parameters())


def base_model_config(study: Study, exact_shape: bool = False):
    """The base model's config, all that matching LoRA targets needs: nothing else is read, nothing written; the tiny
    model is described by its [tiny_model] table, not yet built."""
    from transformers import AutoConfig

    from studykit.hub import ensure_hub_reachable
    from studykit.tiny import tiny_gpt2_config

    if study.tiny_model is not None:
        tiny = study.tiny_model
        if exact_shape:
            return tiny_gpt2_config(tiny.vocab_size, tiny.n_layer, tiny.n_embd, n_head=2, n_positions=256)
        # The layer count and width make the module names; heads and vocabulary change none, so one head always fits.
        return tiny_gpt2_config(tiny.vocab_size, tiny.n_layer, tiny.n_embd, n_head=1, n_positions=256)
    known = known_gpt2_config(study.model)
    if known is not None and not Path(study.model).exists():
        return known  # works offline: the hub's GPT-2 sizes are known by name
    ensure_hub_reachable(study.model, "a local model directory as [budget] model")
    try:
        return AutoConfig.from_pretrained(study.model, trust_remote_code=study.runs[0].config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(
            f"could not read a model config from '{study.model}' ({first_line(error)}); set [budget] model to a model "
            "directory or hub id (and trust_remote_code = true for a model with its own code)."
        ) from None


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
