"""A study's dry run: what each run needs on a GPU (from the base model's config alone, nothing downloaded) and how
long the pending trainings take, before anything runs; the base model's size for the CPU guard and the LoRA target
check comes from the same config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from studykit.analysis import analysis_estimate
from studykit.config import TrainConfig
from studykit.errors import UserError, first_line
from studykit.hub import ensure_hub_reachable
from studykit.memory import GIB, MEMORY_FLAGS, MemoryEstimate, estimate_for_model, gib
from studykit.memory_fit import largest_fitting_by_estimate, with_micro_batch
from studykit.methods import METHODS, method_of
from studykit.modeling import known_gpt2_config, model_skeleton
from studykit.study_file import Study
from studykit.study_state import current_data, finished_record, sweep_result, training_is_current

# The published GPT-2 sizes, as their hub configs give them (the vocabulary of 50,257 and the 1,024 positions are
# GPT2Config's defaults), so that a plan for them needs neither the hub nor their weights.
# What a card holds besides the allocator's memory: the CUDA context with the kernels PyTorch and cuBLAS load into it,
# about 300-450 MiB with CUDA's lazy module loading (the default since CUDA 11.7), and a margin for the allocator's
# fragmentation. Outside the estimate and outside the --max-gpu-memory-gb cap, but on the card.
CUDA_CONTEXT_BYTES = GIB // 2


# The card a plan is checked against: the 6 GB the study was first limited to.
PLAN_CARD_GIB = 6


def planning_config(model: str) -> Any:
    """A base model's config for a plan, without its weights: a known GPT-2 size, else a local directory's config.json.
    None for anything else: a hub id is not looked up, so a plan works offline."""
    from transformers import AutoConfig

    known = known_gpt2_config(model)
    if known is not None:
        return known
    if (Path(model) / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError):
            return None
    return None


def estimate_for_plan(config, model_config, seq_len: int) -> MemoryEstimate:
    """The estimate for a run on a CUDA GPU (precision auto: fp16), from the base model's config alone: the model the
    run trains is built on the meta device, without weights."""
    with torch.device("meta"):
        model, _ = method_of(config).wrap(model_skeleton(model_config), config)
    precision = "fp16" if config.precision == "auto" else config.precision
    return estimate_for_model(
        model, config.batch_size, seq_len, precision, config.gradient_checkpointing, "cuda", config.optimizer
    )


def plan_line(config, model_config, seq_len: int) -> str:
    """What a run needs on a GPU and whether a 6 GB card holds it with the CUDA context, in one line for a dry run.
    Under --auto-batch with a cap, at the micro-batch the estimate would choose (on a GPU a real step decides)."""

    def estimate_at(batch_size: int) -> MemoryEstimate:
        return estimate_for_plan(with_micro_batch(config, batch_size), model_config, seq_len)

    chosen = ""
    if config.auto_batch and config.max_gpu_memory_gb is not None:
        cap = int(config.max_gpu_memory_gb * GIB)
        config = with_micro_batch(config, largest_fitting_by_estimate(config, estimate_at, cap))
        chosen = f", chosen by --auto-batch under {config.max_gpu_memory_gb:g} GiB"
    estimate = estimate_at(config.batch_size)
    on_card = estimate.total + CUDA_CONTEXT_BYTES
    checkpointing = "with" if config.gradient_checkpointing else "without"
    leaner = {"adamw": ", --optimizer adamw8bit", "adamw8bit": ", --optimizer paged-adamw8bit"}.get(
        config.optimizer, ""
    )
    verdict = (
        f"fits a {PLAN_CARD_GIB} GB card"
        if on_card <= PLAN_CARD_GIB * GIB
        else f"does not fit a {PLAN_CARD_GIB} GB card (try {MEMORY_FLAGS}{leaner})"
    )
    return (
        f"needs {gib(estimate.total):.2f} GiB at micro-batch {config.batch_size} x {seq_len} tokens{chosen} "
        f"({estimate.precision}, {config.optimizer}, {checkpointing} gradient checkpointing), "
        f"{gib(on_card):.2f} GiB with the CUDA context: {verdict}"
    )


def print_memory_plan(study: Study) -> None:
    """For a dry run: what each run needs on a GPU, from the base model's config alone (nothing is downloaded)."""
    model_config = planning_config(study.model)
    if model_config is None:
        print(
            f"  {'memory':<24} not estimated: '{study.model}' is neither a GPT-2 size the kit knows nor a local model "
            "directory (yet)"
        )
        return
    for spec in study.runs:
        print(f"  {'memory ' + spec.name:<24} {plan_line(spec.config, model_config, study.prepare.seq_len)}")


def time_estimate(study: Study, assumed_tflops: float) -> list[str]:
    """How long the pending trainings take: model FLOPs per token x tokens x trainings, over an assumed sustained
    throughput, and over the throughput this study's finished trainings measured, where there are some."""
    meta = current_data(study)
    try:
        work = pending_work(study, meta)
    except UserError as error:
        return [f"estimate: not made, the base model's size is unknown here ({error})"]
    measured = measured_tokens_per_second(study, meta["training_fingerprint"] if meta else None)
    pending, flops, tokens, unknown = work.trainings, work.flops, work.tokens_by_method, work.unknown
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
    if work.extra_trainings:
        lines.append(
            f"  (the number of trainings can grow: a sweep whose choice lands at an end of its grid adds the next rate "
            f"beyond it, [budget] grid_extensions = {study.grid_extensions} per run, so at most "
            f"{work.extra_trainings} more training(s), {format_hours(work.extra_flops / (assumed_tflops * 1e12))} more "
            "at the assumed throughput)"
        )
    if meta is None and not unknown:
        lines.append(
            "  (the data is not prepared yet: every sequence counted at full length, so this is an upper bound)"
        )
    if unknown:
        lines.append(
            f"  (runs {unknown} train for epochs over data not yet prepared, so their steps are unknown: prepare the "
            "data once, or give [budget] max_steps)"
        )
    analysis = analysis_estimate(study, meta, base_model_parameters(study), assumed_tflops)
    if analysis:
        lines.append(analysis)
    return lines


@dataclass
class PendingWork:
    """The trainings a study still has to run and what they cost; `extra_*`: what rates added beyond a grid's ends
    may cost on top, at most (whether they are needed is known only once the sweep has chosen)."""

    trainings: int
    flops: float
    tokens_by_method: dict[str, float]
    unknown: list[str]  # runs whose tokens cannot be known yet
    extra_trainings: int = 0
    extra_flops: float = 0.0


def pending_work(study: Study, meta: Optional[dict[str, Any]]) -> PendingWork:
    """The trainings still to run (a run not yet swept counts its grid with the sweep seeds and its first rate with the
    other seeds), their model FLOPs, their tokens by method, and the runs whose tokens cannot be known yet."""
    fingerprint = meta["training_fingerprint"] if meta else None
    total_params = base_model_parameters(study)
    work = PendingWork(0, 0.0, {}, [])
    for spec in study.runs:
        sweep = sweep_result(study, spec, fingerprint, adopt=False)
        trainings = study.sweep_trainings(spec, sweep.learning_rates)
        extra = 0
        if sweep.chosen_lr is None:
            trainings += [
                study.training(spec, spec.learning_rates[0], seed)
                for seed in study.seeds
                if seed not in study.sweep_seeds
            ]
            extra = (study.grid_extensions - len(sweep.added)) * len(study.sweep_seeds) if spec.sweeps else 0
        else:
            trainings += study.replicate_trainings(spec, sweep.chosen_lr)
        pending = {
            t.name for t in trainings if fingerprint is None or not training_is_current(t, fingerprint, adopt=False)
        }
        tokens = training_tokens(spec.config, meta, study.prepare.seq_len)
        if tokens is None:
            work.unknown.append(spec.name)
            continue
        flops_per_training = METHODS[spec.method].flops_per_token(total_params) * tokens
        work.trainings += len(pending)
        work.flops += flops_per_training * len(pending)
        work.tokens_by_method[spec.method] = work.tokens_by_method.get(spec.method, 0) + tokens * len(pending)
        work.extra_trainings += extra
        work.extra_flops += flops_per_training * extra
    return work


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
        # A --train-fraction of the trees holds about that share of the sequences (exactly, once trained).
        sequences = meta["sequences"]["train"] * config.train_fraction
        steps = config.max_steps or math.ceil(config.epochs * (sequences // config.effective_batch))
        return int(steps * config.effective_batch * mean_length)
    if config.max_steps:
        return config.max_steps * config.effective_batch * seq_len
    return None


def measured_tokens_per_second(study: Study, fingerprint: Optional[str]) -> dict[str, float]:
    """The mean real tokens/s of this study's finished trainings, by method."""
    rates: dict[str, list[float]] = {}
    for spec in study.runs:
        grid = sweep_result(study, spec, fingerprint, adopt=False).learning_rates if fingerprint else []
        for lr in grid:
            for seed in study.seeds:
                record = (
                    finished_record(study.training(spec, lr, seed), fingerprint, adopt=False) if fingerprint else None
                )
                if record is not None:
                    rates.setdefault(spec.method, []).append(record.tokens_per_second)
    return {method: sum(values) / len(values) for method, values in rates.items()}


def base_model_parameters(study: Study) -> int:
    """The base model's parameter count, from its config alone (modules on the meta device, no weights)."""
    config = base_model_config(study, exact_shape=True)
    return sum(parameter.numel() for parameter in model_skeleton(config).parameters())


def base_model_config(study: Study, exact_shape: bool = False):
    """The base model's config, all that matching LoRA targets needs: nothing else is read, nothing written; the tiny
    model is described by its [tiny_model] table, not yet built."""
    from transformers import AutoConfig

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
