"""The one training loop both methods share. A method (methods.py) only decides how the base model is wrapped, what
a token costs and how parameters are grouped; the scripts differ only in the method they name."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from studykit import checkpointing, locks, memory_fit
from studykit.batching import resolve_pad_multiple, step_batches
from studykit.config import TrainConfig, check_packing_context, config_to_dict, print_config, save_config
from studykit.data import (
    check_tokenizer_matches,
    length_sorted_batches,
    load_processed,
    pack_sequences,
    plan_step_windows,
    predicted_tokens,
    split_prompt_lengths,
    split_window,
)
from studykit.errors import UserError
from studykit.hub_upload import push_folder
from studykit.io import check_writable_location, ensure_writable_directory
from studykit.learning_curves import dev_loss_steps, is_log_step
from studykit.loss import batch_nll, resolve_loss_kernel, use_loss_kernel
from studykit.methods import Method, method_of
from studykit.metrics import score_sequences
from studykit.modeling import (
    base_model_fingerprint,
    check_model_fits_tokenizer,
    count_parameters,
    describe_kernels,
    enable_activation_checkpointing,
    load_base_model,
    load_tokenizer,
    model_context_length,
)
from studykit.optimizers import build_optimizer
from studykit.run_dir import (
    RUN_LOG,
    TRAIN_CONFIG,
    RunLog,
    check_run_directory,
    clear_previous_run,
)
from studykit.run_state import PreparedRun, RunRecord, TrainingParts, TrainingState
from studykit.runtime import (
    build_accelerator,
    code_version,
    device_peak_tflops,
    is_sharded,
    model_flops_utilization,
    parallelism,
    peak_memory_bytes,
    peak_memory_kind,
    precision_name,
    refuse_slow_cpu_run,
    reset_peak_memory,
    stage_code_version,
)
from studykit.safeguards import Safeguards
from studykit.subsets import subset_indices
from studykit.trackers import Trackers, accelerator_tracking, check_tracker_installed


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def prepare_run(config: TrainConfig) -> PreparedRun:
    """Check every input, build the model the config's method trains, its optimizer and schedule."""
    method = method_of(config)
    accelerator = build_accelerator(
        config.precision, config.seed, config.device, **accelerator_tracking(config.report_to, Path(config.output_dir))
    )
    loss_kernel = resolve_loss_kernel(config.loss_kernel, accelerator.device.type)
    # Saved as resolved, so train_config.json and run.json say what the batches were padded to.
    pad_multiple = resolve_pad_multiple(config.pad_to_multiple_of, accelerator.device.type)
    config = dataclasses.replace(config, pad_to_multiple_of=pad_multiple)
    data = load_processed(config.data_dir)
    # Known only once the data is read; a study checks it with its file (study_file.load_study).
    check_packing_context(config.packing, data.meta.get("context", "none"))
    tokenizer_name = config.tokenizer or config.model
    tokenizer = load_tokenizer(
        tokenizer_name, "--tokenizer" if config.tokenizer else "--model", config.trust_remote_code
    )
    check_tokenizer_matches(data, tokenizer, tokenizer_name)
    model, description = build_model(config, method, data.meta["seq_len"], loss_kernel)
    check_model_fits_tokenizer(model, tokenizer, config.model, tokenizer_name)
    description["peak_tflops_per_device"] = device_peak_tflops(accelerator.device, config.peak_tflops)

    train_split = training_subset(data.train, config.train_fraction)
    train_sequences, train_prompt_lengths = list(train_split["input_ids"]), split_prompt_lengths(train_split)
    if config.packing:
        train_sequences = pack_sequences(train_sequences, data.meta["seq_len"])
        train_prompt_lengths = [0] * len(train_sequences)  # packing is refused for data with prompts
    examples_per_step = config.effective_batch * accelerator.num_processes
    windows_per_epoch = len(train_sequences) // examples_per_step
    if windows_per_epoch == 0:
        raise UserError(
            f"the training split has {len(train_sequences)} sequences, fewer than one optimizer step needs "
            f"({examples_per_step}); lower --batch-size or --grad-accum."
        )
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * windows_per_epoch))
    window_tokens = sum(map(len, train_sequences)) / len(train_sequences) * examples_per_step
    refuse_slow_cpu_run(
        config.device,
        f"training {config.model} for {total_steps:,} steps",
        lambda: (description["total_params"], description["flops_per_token"] * window_tokens * total_steps),
    )

    optimizer = build_optimizer(method.parameter_groups(model, config), config, accelerator.device)
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, config.lr_schedule)
    )
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    config, description["memory"] = memory_fit.plan_memory(config, model, accelerator, max(train_sequences, key=len))
    parts = TrainingParts(accelerator, model, optimizer, scheduler)
    return PreparedRun(
        config,
        parts,
        tokenizer,
        train_sequences,
        list(data.dev["input_ids"]),
        data.meta,
        total_steps,
        windows_per_epoch,
        description,
        train_prompt_lengths=train_prompt_lengths,
        dev_prompt_lengths=split_prompt_lengths(data.dev),
    )


def training_subset(train_split, fraction: float):
    """The responses of the conversation trees in --train-fraction (all of them at 1); dev and test are never cut."""
    if fraction >= 1.0:
        return train_split
    kept = subset_indices(train_split["message_tree_id"], fraction)
    if not kept:
        raise UserError(
            f"--train-fraction {fraction:g} keeps none of the training split's {len(train_split):,} responses; "
            "raise it."
        )
    return train_split.select(kept)


def build_model(config: TrainConfig, method: Method, seq_len: int, loss_kernel: str) -> tuple[Any, dict[str, Any]]:
    """The base model wrapped by the method, its loss computed by `loss_kernel`, and what the run records about it."""
    base_model = load_base_model(config.model, "--model", config.trust_remote_code)
    context = model_context_length(base_model)
    if seq_len > context:
        raise UserError(
            f"the data's --seq-len {seq_len} exceeds the model's context of {context}; prepare it again with --seq-len "
            f"{context}."
        )
    # Taken before LoRA wraps (and renames) the base weights; evaluation checks an adapter's base against it.
    base_fingerprint = base_model_fingerprint(base_model)
    model, description = method.wrap(base_model, config)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    use_loss_kernel(model, loss_kernel)
    trainable, total = count_parameters(model)
    description.update(
        base_model_fingerprint=base_fingerprint,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100.0 * trainable / total,
        kernels=describe_kernels(model),
        flops_per_token=method.flops_per_token(total),
    )
    return model, description


@dataclasses.dataclass
class StepShare:
    """This process's micro-batches of one optimizer step, and token counts of the whole step over all processes."""

    micro_batches: list[list[int]]
    predicted_tokens: int  # the step's targets, which its loss is the mean over
    # The responses' tokens (prompts left out), each example's first token included: what tokens_seen counts.
    response_tokens: int


def micro_batches_for_step(run: PreparedRun, step: int, lengths: list[int], prompt_lengths: list[int]) -> StepShare:
    """This process's micro-batches for optimizer step `step`, and the tokens of the whole step."""
    config, accelerator = run.config, run.accelerator
    epoch, index = divmod(step, run.windows_per_epoch)
    if epoch not in run.windows_by_epoch:
        run.windows_by_epoch.clear()
        run.windows_by_epoch[epoch] = plan_step_windows(
            lengths, run.examples_per_step, config.seed, epoch, config.group_by_length
        )
    window = run.windows_by_epoch[epoch][index]
    micro_batches = split_window(window, lengths, config.grad_accum * accelerator.num_processes)
    return StepShare(
        micro_batches[accelerator.process_index :: accelerator.num_processes],
        sum(predicted_tokens(lengths[i], prompt_lengths[i]) for i in window),
        sum(lengths[i] - prompt_lengths[i] for i in window),
    )


def dev_loss(run: PreparedRun) -> float:
    """Token-weighted mean NLL over the whole dev split; each process scores a share, then they sum."""
    accelerator = run.accelerator
    batches = length_sorted_batches([len(s) for s in run.dev_sequences], run.config.eval_batch_size)
    share = batches[accelerator.process_index :: accelerator.num_processes]
    # Under DDP the shares differ by a batch, and the wrapped model's forward broadcasts buffers to every process (a
    # collective: transformers 5.0's GPT-2 has buffers), so a process with a batch more would wait forever. Scoring
    # needs no gradient sync: the module inside scores alone. FSDP needs its own forward (the weights are sharded).
    scorer = run.model if is_sharded(accelerator) else accelerator.unwrap_model(run.model)
    scores = score_sequences(
        scorer,
        run.dev_sequences,
        run.config.eval_batch_size,
        accelerator.device,
        run.tokenizer.pad_token_id,
        accelerator.autocast,
        batch_indices=share,
        prompt_lengths=run.dev_prompt_lengths,
    )
    if is_sharded(accelerator) and len(share) < math.ceil(len(batches) / accelerator.num_processes):
        # Under FSDP every forward pass gathers weights from all processes: one left with a batch fewer joins
        # the others' last pass with a throwaway one, or they would wait for it forever.
        score_sequences(
            run.model,
            run.dev_sequences,
            run.config.eval_batch_size,
            accelerator.device,
            run.tokenizer.pad_token_id,
            accelerator.autocast,
            batch_indices=batches[:1],
        )
    totals = torch.tensor([scores.nll_sum, float(scores.tokens)], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


def forward_backward(
    run: PreparedRun, micro_batches: list[list[int]], step_tokens: int, state: TrainingState
) -> torch.Tensor:
    """Accumulate one optimizer step's gradients; return the step's token-weighted loss over all processes, on the
    device (reading it would make the host wait for the device once per micro-batch)."""
    accelerator, model = run.accelerator, run.model
    step_nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    prompts = run.train_prompt_lengths
    batches = step_batches(
        [[run.train_sequences[i] for i in indices] for indices in micro_batches],
        run.tokenizer.pad_token_id,
        run.config.pad_to_multiple_of,
        run.data_meta["seq_len"],
        accelerator.device,
        [[prompts[i] for i in indices] for indices in micro_batches] if prompts else None,
    )
    for position, batch in enumerate(batches):
        last = position == len(batches) - 1
        # DDP averages gradients over processes; scaling by their number makes the step's gradient
        # the token-weighted mean over the whole window, however it is split.
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            nll = batch_nll(model, batch, accelerator.autocast).total
            accelerator.backward(nll * accelerator.num_processes / step_tokens)
        step_nll += nll.detach().double()
        state.padded_tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
    if accelerator.num_processes > 1:
        step_nll = accelerator.reduce(step_nll, reduction="sum")
    return step_nll / step_tokens


def optimizer_step(run: PreparedRun, step_loss: torch.Tensor, state: TrainingState) -> tuple[float, float, bool]:
    """Clip, then step (or skip a non-finite step), zero the gradients and advance the schedule. Returns the step's
    loss, its gradient norm before clipping, and whether the step was finite."""
    accelerator, config = run.accelerator, run.config
    # Clipping at inf still measures the norm.
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or math.inf)
    # The step's one wait for the device: the loss and the norm reach the host together.
    loss, norm = torch.stack(
        [step_loss.double(), torch.as_tensor(grad_norm, device=step_loss.device).double()]
    ).tolist()
    # fp16's scaler skips overflowing gradients itself (and must see them to lower its scale); without a scaler, a
    # non-finite gradient is skipped here.
    finite = math.isfinite(loss) and (accelerator.scaler is not None or math.isfinite(norm))
    if finite:
        run.optimizer.step()
        if accelerator.optimizer_step_was_skipped:
            state.skipped_steps += 1
    else:
        # A non-finite step never reaches the weights: it is skipped, as the fp16 scaler would.
        state.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return loss, norm, finite


def train(config: TrainConfig) -> RunRecord:
    """Run one training job end to end and return its run record (also written to run.json)."""
    output_dir = Path(config.output_dir)
    check_writable_location(output_dir, "--output-dir")
    check_tracker_installed(config.report_to)
    # Under `accelerate launch` the main process holds the lock for all of them (the launcher's RANK, known before
    # the accelerator exists).
    with locks.exclusive(output_dir, "--output-dir", enabled=launch_rank() == 0):
        return train_holding_lock(config, output_dir)


def launch_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun, read before the accelerator exists."""
    return int(os.environ.get("RANK", "0"))


def train_holding_lock(config: TrainConfig, output_dir: Path) -> RunRecord:
    resume_from = check_run_directory(output_dir, config.resume, config.overwrite)
    if launch_rank() == 0:
        # Under `accelerate launch` every process parses the same flags; one copy of the config is enough.
        print_config(config)
    run = prepare_run(config)
    config, accelerator = (
        run.config,
        run.accelerator,
    )  # --auto-batch may have chosen another micro-batch: save what is used
    state = TrainingState()
    if resume_from is not None:
        state = checkpointing.load_resumable(resume_from, run.parts, run.identity())
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    # Every input has been checked: only now may an earlier run be cleared and files be written.
    if accelerator.is_main_process:
        ensure_writable_directory(output_dir, "--output-dir")
        if config.overwrite:
            clear_previous_run(output_dir)
        save_config(config, output_dir / TRAIN_CONFIG)
        describe_run(run)
    log = RunLog(output_dir / RUN_LOG, accelerator.is_main_process, keep_until_step=state.step)
    state.start_session(run.total_steps)
    lengths = [len(s) for s in run.train_sequences]
    prompt_lengths = run.train_prompt_lengths or [0] * len(lengths)
    run.model.train()
    reset_peak_memory(accelerator.device)
    progress = tqdm(
        total=run.total_steps,
        initial=state.step,
        desc=f"{config.method} training",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )

    trackers = Trackers(accelerator, config.report_to, output_dir, config_to_dict(config), resumed_at_step=state.step)

    # The bar is closed however the loop ends, so an error line is the last thing on the terminal; the tracker finishes
    # however it ends, so its files are complete.
    with (
        progress,
        trackers,
        Safeguards(run, output_dir) as safeguards,
        memory_fit.out_of_memory_as_user_error(run.description["memory"]["estimate"]),
    ):
        while state.step < run.total_steps:
            step_started = time.perf_counter()
            lr = run.scheduler.get_last_lr()[0]  # the rate this step trains with; optimizer_step moves the schedule on
            share = micro_batches_for_step(run, state.step, lengths, prompt_lengths)
            step_loss = forward_backward(run, share.micro_batches, share.predicted_tokens, state)
            loss, grad_norm, finite = optimizer_step(run, step_loss, state)
            safeguards.check_step(finite, state.step)
            state.record_step(loss, share.response_tokens, time.perf_counter() - step_started)
            validate_and_log(run, state, lr, grad_norm, log, trackers, progress)
            safeguards.save_if_due(state)
        safeguards.check_final(state)
        record = build_run_record(run, state)
        # Still under the safeguards' signal handlers: a Ctrl-C now lets the final save finish rather than lose the run.
        checkpointing.save_final(run.parts, run.tokenizer, record, run.data_meta, output_dir)
    if config.push_to_hub and accelerator.is_main_process:
        push_folder(output_dir, config.push_to_hub)
    return record


def validate_and_log(
    run: PreparedRun, state: TrainingState, lr: float, grad_norm: float, log: RunLog, trackers: Trackers, progress
) -> None:
    """The progress bar after every step; the dev loss every --eval-every steps and at the end; a log.jsonl line every
    --log-every steps and with every dev loss, and the same entry to the tracker (--report-to)."""
    config = run.config
    show_progress(run, state, lr, progress)
    entry = {
        "step": state.step,
        "train_loss": state.last_train_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": state.tokens_per_second,
    }
    validate_now = (
        bool(config.eval_every and state.step % config.eval_every == 0)
        or state.step == run.total_steps
        or (config.eval_schedule == "log" and is_log_step(state.step))
    )
    if validate_now:
        state.last_dev_loss = entry["dev_loss"] = dev_loss(run)
        if run.accelerator.is_local_main_process:
            progress.write(f"step {state.step}: dev loss {state.last_dev_loss:.4f}")
    if validate_now or state.step % config.log_every == 0:
        entry["skipped_steps"] = state.skipped_steps
        log.write(entry)
        trackers.log(entry)


def show_progress(run: PreparedRun, state: TrainingState, lr: float, progress) -> None:
    """Loss, learning rate, tokens/s and MFU over the whole run, and after warm-up (steady) once a step is past it."""
    steady = state.steady_tokens_per_second
    speed = f"{state.tokens_per_second:,.0f}" + (f" (steady {steady:,.0f})" if steady is not None else "")
    mfu, steady_mfu = run_mfu(run, state.tokens_per_second), run_mfu(run, steady)
    utilization = {}
    if mfu is not None:
        utilization["mfu"] = f"{mfu:.1%}" + (f" (steady {steady_mfu:.1%})" if steady_mfu is not None else "")
    progress.update(1)
    progress.set_postfix(loss=f"{state.last_train_loss:.4f}", lr=f"{lr:.2e}", tok_s=speed, **utilization)


def run_mfu(run: PreparedRun, tokens_per_second: Optional[float]) -> Optional[float]:
    if tokens_per_second is None:
        return None
    description = run.description
    return model_flops_utilization(
        tokens_per_second,
        description["flops_per_token"],
        description["peak_tflops_per_device"],
        run.accelerator.num_processes,
    )


def describe_run(run: PreparedRun) -> None:
    description = run.description
    print(
        f"trainable parameters: {description['trainable_params']:,} of {description['total_params']:,} "
        f"({description['trainable_percent']:.3f}%)"
    )
    if description.get("adapted_modules"):
        print(f"adapted modules ({len(description['adapted_modules'])}):")
        for name in description["adapted_modules"]:
            print(f"  {name}")
    accelerator = run.accelerator
    print(
        f"optimizer steps: {run.total_steps} ({run.windows_per_epoch} per epoch), effective batch "
        f"{run.examples_per_step} sequences, processes: {accelerator.num_processes} "
        f"({parallelism(accelerator)}), device: {accelerator.device}, precision: "
        f"{precision_name(accelerator.mixed_precision)}"
    )
    config = run.config
    passes = dev_loss_steps(run.total_steps, config.eval_every, config.eval_schedule)
    print(
        f"dev loss after {len(passes)} of the {run.total_steps} steps ({config.eval_schedule} schedule), each a pass "
        f"over the dev split's {len(run.dev_sequences):,} responses"
    )
    print(
        "kernels: " + ", ".join(f"{part.replace('_', ' ')} {kernel}" for part, kernel in description["kernels"].items())
    )
    peak = description["peak_tflops_per_device"]
    device_name = (
        torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.device.type
    )
    print(
        f"model FLOPs per token: {description['flops_per_token']:,}; MFU "
        + (
            f"against {peak:g} TFLOP/s per device"
            if peak
            else f"not reported: no known peak for {device_name} (--peak-tflops sets one)"
        )
    )


def build_run_record(run: PreparedRun, state: TrainingState) -> RunRecord:
    config, accelerator = run.config, run.accelerator
    return RunRecord(
        method=config.method,
        config=config_to_dict(config),
        **run.description,
        base_model=config.model,
        data_dir=str(config.data_dir),
        training_data_fingerprint=run.data_meta["training_fingerprint"],
        dev_fingerprint=run.data_meta["dev_fingerprint"],
        tokenizer_fingerprint=run.data_meta.get("tokenizer_fingerprint"),
        seq_len=run.data_meta["seq_len"],
        packing=config.packing,
        seed=config.seed,
        effective_batch=run.examples_per_step,
        num_processes=accelerator.num_processes,
        parallelism=parallelism(accelerator),
        steps=state.step,
        tokens_seen=state.tokens_seen,
        padded_tokens_seen=state.padded_tokens_seen,
        wall_time_seconds=state.train_seconds,
        tokens_per_second=state.tokens_per_second,
        mfu=run_mfu(run, state.tokens_per_second),
        steady_tokens_per_second=state.steady_tokens_per_second,
        steady_mfu=run_mfu(run, state.steady_tokens_per_second),
        warmup_steps=state.warmup_steps,
        peak_memory_bytes=peak_memory_bytes(accelerator.device),
        peak_memory_kind=peak_memory_kind(accelerator.device),
        skipped_steps=state.skipped_steps,
        final_train_loss=state.last_train_loss,
        final_dev_loss=state.last_dev_loss,
        device=str(accelerator.device),
        precision=precision_name(accelerator.mixed_precision),
        versions=runtime_versions(),
        train_code_version=stage_code_version("studykit.trainer"),
    )


def runtime_versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    from studykit import __version__

    return {
        "studykit": __version__,
        "code": code_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
