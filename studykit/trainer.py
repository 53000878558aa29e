"""The one training loop both methods share. The scripts differ only in the `wrap_model` they pass in."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from studykit import checkpointing, locks, memory
from studykit.config import TrainConfig, config_to_dict, print_config, save_config
from studykit.data import check_tokenizer_matches, collate, length_sorted_batches, load_processed, pack_sequences, plan_step_windows, split_window
from studykit.errors import UserError
from studykit.io import check_writable_location, ensure_writable_directory
from studykit.loss import batch_nll
from studykit.metrics import score_sequences
from studykit.modeling import (base_model_fingerprint, count_parameters, describe_kernels, enable_activation_checkpointing, load_base_model,
                               load_tokenizer, model_context_length)
from studykit.runtime import (build_accelerator, device_peak_tflops, model_flops_utilization, parallelism, peak_memory_bytes,
                              precision_name, reset_peak_memory, training_flops_per_token)

# A loss that is NaN or inf this many steps in a row ends the run; fp16 overflow alone is skipped by the scaler.
NONFINITE_PATIENCE = 3


@dataclass
class TrainingState:
    """What a resumable checkpoint restores besides weights and optimizer: the position in the run."""

    step: int = 0
    tokens_seen: int = 0
    padded_tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    last_train_loss: Optional[float] = None
    last_validation_loss: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PreparedRun:
    config: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    train_sequences: list
    validation_sequences: list
    data_meta: dict
    total_steps: int
    windows_per_epoch: int
    description: dict = field(default_factory=dict)
    # The step windows of the current epoch, planned once per epoch.
    windows_by_epoch: dict = field(default_factory=dict)


def parameter_groups(model, weight_decay: float, lr: float, lora_b_lr_ratio: Optional[float]) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm; LoRA+ gives the B matrices a larger learning rate."""
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.ndim >= 2 and "ln_" not in name and "norm" not in name.lower()
        group_lr = lr * lora_b_lr_ratio if lora_b_lr_ratio and "lora_B" in name else lr
        groups.setdefault((decays, group_lr), []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": group_lr}
        for (decays, group_lr), params in groups.items()
    ]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def prepare_run(config: TrainConfig, wrap_model: Callable[[Any], tuple[Any, dict]]) -> PreparedRun:
    accelerator = build_accelerator(config.precision, config.seed)
    data = load_processed(config.data_dir)
    tokenizer_name = config.tokenizer or config.model
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer" if config.tokenizer else "--model", config.trust_remote_code)
    check_tokenizer_matches(data, tokenizer, tokenizer_name)

    base_model = load_base_model(config.model, "--model", config.trust_remote_code)
    context = model_context_length(base_model)
    if data.meta["seq_len"] > context:
        raise UserError(f"the data's --seq-len {data.meta['seq_len']} exceeds the model's context of {context}; prepare it again with --seq-len {context}.")
    # Taken before LoRA wraps (and renames) the base weights; evaluation checks an adapter's base against it.
    base_fingerprint = base_model_fingerprint(base_model)
    model, description = wrap_model(base_model)
    description["base_model_fingerprint"] = base_fingerprint
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    description.update(trainable_params=trainable, total_params=total, trainable_percent=100.0 * trainable / total,
                       kernels=describe_kernels(model), flops_per_token=training_flops_per_token(total, config.method),
                       peak_tflops_per_device=device_peak_tflops(accelerator.device, config.peak_tflops))

    train_sequences = list(data.train["input_ids"])
    if config.packing:
        train_sequences = pack_sequences(train_sequences, data.meta["seq_len"])
    examples_per_step = config.effective_batch * accelerator.num_processes
    windows_per_epoch = len(train_sequences) // examples_per_step
    if windows_per_epoch == 0:
        raise UserError(
            f"the training split has {len(train_sequences)} sequences, fewer than one optimizer step needs "
            f"({examples_per_step}); lower --batch-size or --grad-accum."
        )
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * windows_per_epoch))

    groups = parameter_groups(model, config.weight_decay, config.lr, getattr(config, "loraplus_lr_ratio", None))
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, config.lr_schedule)
    )
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    config, description["memory"] = memory.plan_memory(config, model, accelerator, max(train_sequences, key=len))
    return PreparedRun(
        config, accelerator, model, optimizer, scheduler, tokenizer, train_sequences,
        list(data.validation["input_ids"]), data.meta, total_steps, windows_per_epoch, description,
    )


def micro_batches_for_step(run: PreparedRun, step: int, lengths: list[int]) -> tuple[list[list[int]], int]:
    """This process's micro-batches for optimizer step `step`, and the predicted tokens of the whole step."""
    config, accelerator = run.config, run.accelerator
    epoch, index = divmod(step, run.windows_per_epoch)
    windows = _windows_for_epoch(run, epoch, lengths)
    window = windows[index]
    micro_batches = split_window(window, lengths, config.grad_accum * accelerator.num_processes)
    step_tokens = sum(lengths[i] - 1 for i in window)
    return micro_batches[accelerator.process_index :: accelerator.num_processes], step_tokens


def _windows_for_epoch(run: PreparedRun, epoch: int, lengths: list[int]) -> list[list[int]]:
    if epoch not in run.windows_by_epoch:
        run.windows_by_epoch.clear()
        run.windows_by_epoch[epoch] = plan_step_windows(
            lengths, run.config.effective_batch * run.accelerator.num_processes, run.config.seed, epoch, run.config.group_by_length
        )
    return run.windows_by_epoch[epoch]


def validation_loss(run: PreparedRun) -> float:
    """Token-weighted mean NLL over the whole validation split; each process scores a share, then they sum."""
    accelerator = run.accelerator
    batches = length_sorted_batches([len(s) for s in run.validation_sequences], run.config.eval_batch_size)
    share = batches[accelerator.process_index :: accelerator.num_processes]
    scores = score_sequences(
        run.model, run.validation_sequences, run.config.eval_batch_size, accelerator.device,
        run.tokenizer.pad_token_id, accelerator.autocast, batch_indices=share,
    )
    if checkpointing.is_sharded(run) and len(share) < math.ceil(len(batches) / accelerator.num_processes):
        # Under FSDP every forward pass gathers weights from all processes: one left with a batch fewer joins
        # the others' last pass with a throwaway one, or they would wait for it forever.
        score_sequences(run.model, run.validation_sequences, run.config.eval_batch_size, accelerator.device,
                        run.tokenizer.pad_token_id, accelerator.autocast, batch_indices=batches[:1])
    totals = torch.tensor([scores.nll_sum, float(scores.tokens)], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1])


class InterruptFlag:
    """SIGINT and SIGTERM finish the current step, save a resumable checkpoint, then exit."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "InterruptFlag":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            # A second Ctrl-C means "now": stop without the checkpoint (atomic writes leave no half-written one).
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled, agreed by all, so every process saves and stops at the same step."""
        return processes_where(accelerator, self.signal_name is not None) > 0

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def processes_where(accelerator, holds: bool) -> int:
    """How many processes this holds on. Decisions that change what a process does next (stop, save, raise) are
    taken on this count, so that no process goes on alone and leaves the others waiting for it."""
    if accelerator.num_processes == 1:
        return int(holds)
    count = accelerator.reduce(torch.tensor(float(holds), device=accelerator.device), reduction="sum")
    return int(count)


def weights_are_finite(run: PreparedRun) -> bool:
    """Whether every trainable weight is finite, agreed by all processes (under FSDP each sees only its own slice)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in run.model.parameters() if p.requires_grad)
    return processes_where(run.accelerator, local) == run.accelerator.num_processes


def diverged_error(run: PreparedRun, what: str, suspect_from_step: int) -> UserError:
    """Training diverged: checkpoints from `suspect_from_step` on hold the weights that did it; they are set aside
    (renamed), so the latest resumable checkpoint is a good one."""
    output_dir = Path(run.config.output_dir)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        checkpointing.set_aside_diverged(output_dir, suspect_from_step)
    run.accelerator.wait_for_everyone()
    checkpoints = checkpointing.resumable_checkpoints(output_dir)
    good = checkpoints[-1] if checkpoints else None
    kept = f"the last good checkpoint is {good}" if good else "no good resumable checkpoint was saved (see --save-every)"
    return UserError(f"{what}; {kept}; start again with --overwrite and a lower --lr, or --precision fp32/bf16.")


def forward_backward(run: PreparedRun, micro_batches: list[list[int]], step_tokens: int, state: TrainingState) -> float:
    """Accumulate one optimizer step's gradients; return the step's token-weighted loss over all processes."""
    accelerator, model = run.accelerator, run.model
    step_nll = 0.0
    for position, indices in enumerate(micro_batches):
        batch = collate([run.train_sequences[i] for i in indices], run.tokenizer.pad_token_id)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        last = position == len(micro_batches) - 1
        # DDP averages gradients over processes; scaling by their number makes the step's gradient
        # the token-weighted mean over the whole window, however it is split.
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            nll = batch_nll(model, batch, accelerator.autocast).total
            accelerator.backward(nll * accelerator.num_processes / step_tokens)
        step_nll += float(nll.detach())
        state.padded_tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
    return float(accelerator.reduce(torch.tensor(step_nll, device=accelerator.device), reduction="sum")) / step_tokens


def optimizer_step(run: PreparedRun, step_loss: float, state: TrainingState) -> tuple[bool, float]:
    """Clip, then step (or skip a non-finite step), zero the gradients and advance the schedule.
    Returns whether the step was finite, and the gradient norm before clipping."""
    accelerator, config = run.accelerator, run.config
    # Clipping at inf still measures the norm. fp16's scaler skips overflowing gradients itself (and must see
    # them to lower its scale); without a scaler, a non-finite gradient is skipped here.
    grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or math.inf))
    finite = math.isfinite(step_loss) and (accelerator.scaler is not None or math.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
        if accelerator.optimizer_step_was_skipped:
            state.skipped_steps += 1
    else:
        # A non-finite step never reaches the weights: it is skipped, as the fp16 scaler would.
        state.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return finite, grad_norm


def train(config: TrainConfig, wrap_model: Callable[[Any], tuple[Any, dict]]) -> dict[str, Any]:
    """Run one training job end to end and return its run record (also written to run.json)."""
    output_dir = Path(config.output_dir)
    check_writable_location(output_dir, "--output-dir")
    # Under `accelerate launch` the main process holds the lock for all of them (the launcher's RANK, known before
    # the accelerator exists).
    with locks.exclusive(output_dir, "--output-dir", enabled=os.environ.get("RANK", "0") == "0"):
        return train_holding_lock(config, wrap_model, output_dir)


def train_holding_lock(config: TrainConfig, wrap_model: Callable[[Any], tuple[Any, dict]], output_dir: Path) -> dict[str, Any]:
    resume_from = checkpointing.check_run_directory(output_dir, config.resume, config.overwrite)
    if os.environ.get("RANK", "0") == "0":
        # Under `accelerate launch` every process parses the same flags; one copy of the config is enough.
        # (The launcher's RANK, read before the accelerator exists, which needs the checks above to pass first.)
        print_config(config)
    run = prepare_run(config, wrap_model)
    config, accelerator = run.config, run.accelerator  # --auto-batch may have chosen another micro-batch: save what is used
    state = TrainingState()
    if resume_from is not None:
        state = checkpointing.load_resumable(resume_from, run)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    # Every input has been checked: only now may an earlier run be cleared and files be written.
    if accelerator.is_main_process:
        ensure_writable_directory(output_dir, "--output-dir")
        if config.overwrite:
            checkpointing.clear_previous_run(output_dir)
        save_config(config, output_dir / "train_config.json")
        describe_run(run)
    log = checkpointing.RunLog(output_dir / "log.jsonl", accelerator.is_main_process, keep_until_step=state.step)

    lengths = [len(s) for s in run.train_sequences]
    run.model.train()
    reset_peak_memory(accelerator.device)
    progress = tqdm(total=run.total_steps, initial=state.step, desc=f"{config.method} training", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    nonfinite_streak = 0
    # A checkpoint replaces older ones only once the loss of the step after it is finite (see diverged_error).
    unconfirmed_checkpoint = False
    # The bar is closed however the loop ends, so an error line is the last thing on the terminal.
    with progress, InterruptFlag() as interrupt, memory.out_of_memory_as_user_error(run.description["memory"]["estimate"]):
        while state.step < run.total_steps:
            step_started = time.perf_counter()
            lr = run.scheduler.get_last_lr()[0]  # the rate this step trains with; optimizer_step moves the schedule on
            micro_batches, step_tokens = micro_batches_for_step(run, state.step, lengths)
            step_loss = forward_backward(run, micro_batches, step_tokens, state)
            finite, grad_norm = optimizer_step(run, step_loss, state)
            nonfinite_streak = 0 if finite else nonfinite_streak + 1
            if nonfinite_streak >= NONFINITE_PATIENCE:
                # Skipped steps leave the weights alone: those of the step before the streak produced every NaN.
                raise diverged_error(run, f"the training loss was NaN or inf for {NONFINITE_PATIENCE} steps in a row "
                                     f"(steps {state.step + 2 - nonfinite_streak}-{state.step + 1})", state.step + 1 - nonfinite_streak)
            if finite and unconfirmed_checkpoint and accelerator.is_main_process:
                checkpointing.prune_resumable(output_dir, config.keep)
            unconfirmed_checkpoint = unconfirmed_checkpoint and not finite
            state.step += 1
            # The whole window's tokens (over all processes): its predicted tokens plus each example's first token.
            state.tokens_seen += step_tokens + config.effective_batch * accelerator.num_processes
            state.train_seconds += time.perf_counter() - step_started
            state.last_train_loss = step_loss
            tokens_per_second = state.tokens_seen / max(state.train_seconds, 1e-9)
            progress.update(1)
            mfu = run_mfu(run, tokens_per_second)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}",
                                 **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))

            validate_now = bool(config.eval_every and state.step % config.eval_every == 0) or state.step == run.total_steps
            entry = {"step": state.step, "train_loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                     "tokens_per_second": tokens_per_second}
            if validate_now:
                state.last_validation_loss = validation_loss(run)
                entry["validation_loss"] = state.last_validation_loss
                if accelerator.is_local_main_process:
                    progress.write(f"step {state.step}: validation loss {state.last_validation_loss:.4f}")
            if validate_now or state.step % config.log_every == 0:
                entry["skipped_steps"] = state.skipped_steps
                log.write(entry)
            stop = interrupt.requested(accelerator)
            due = config.save_every and state.step % config.save_every == 0 and state.step < run.total_steps
            # During a NaN streak a scheduled save waits (the weights are suspect); an interrupt still saves its position.
            if (due and not nonfinite_streak) or stop:
                if not weights_are_finite(run):
                    raise diverged_error(run, f"the weights became NaN or inf at step {state.step}", state.step)
                checkpointing.save_resumable(run, state, output_dir)
                unconfirmed_checkpoint = True
            if stop:
                raise checkpointing.Interrupted(interrupt.signal_name or "SIGTERM", state.step, output_dir)
        if not weights_are_finite(run):
            raise diverged_error(run, f"the weights became NaN or inf by step {state.step}", state.step)
        record = build_run_record(run, state)
        # Still under InterruptFlag: a Ctrl-C now lets the final save finish rather than lose the finished run.
        checkpointing.save_final(run, state, output_dir, record)
    return record


def run_mfu(run: PreparedRun, tokens_per_second: float) -> Optional[float]:
    description = run.description
    return model_flops_utilization(tokens_per_second, description["flops_per_token"], description["peak_tflops_per_device"],
                                   run.accelerator.num_processes)


def describe_run(run: PreparedRun) -> None:
    description = run.description
    print(f"trainable parameters: {description['trainable_params']:,} of {description['total_params']:,} "
          f"({description['trainable_percent']:.3f}%)")
    if description.get("adapted_modules"):
        print(f"adapted modules ({len(description['adapted_modules'])}):")
        for name in description["adapted_modules"]:
            print(f"  {name}")
    accelerator = run.accelerator
    print(f"optimizer steps: {run.total_steps} ({run.windows_per_epoch} per epoch), effective batch "
          f"{run.config.effective_batch * accelerator.num_processes} sequences, processes: {accelerator.num_processes} "
          f"({parallelism(accelerator)}), device: {accelerator.device}, precision: {precision_name(accelerator.mixed_precision)}")
    print("kernels: " + ", ".join(f"{part.replace('_', ' ')} {kernel}" for part, kernel in description["kernels"].items()))
    peak = description["peak_tflops_per_device"]
    device_name = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.device.type
    print(f"model FLOPs per token: {description['flops_per_token']:,}; MFU "
          + (f"against {peak:g} TFLOP/s per device" if peak else f"not reported: no known peak for {device_name} (--peak-tflops sets one)"))


def build_run_record(run: PreparedRun, state: TrainingState) -> dict[str, Any]:
    config, accelerator = run.config, run.accelerator
    tokens_per_second = state.tokens_seen / max(state.train_seconds, 1e-9)
    return {
        "method": config.method,
        "config": config_to_dict(config),
        **run.description,
        "base_model": config.model,
        "data_dir": str(config.data_dir),
        "data_fingerprint": run.data_meta["fingerprint"],
        "validation_fingerprint": run.data_meta["validation_fingerprint"],
        "tokenizer_fingerprint": run.data_meta.get("tokenizer_fingerprint"),
        "seq_len": run.data_meta["seq_len"],
        "packing": config.packing,
        "seed": config.seed,
        "effective_batch": config.effective_batch * accelerator.num_processes,
        "num_processes": accelerator.num_processes,
        "parallelism": parallelism(accelerator),
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "padded_tokens_seen": state.padded_tokens_seen,
        "wall_time_seconds": state.train_seconds,
        "tokens_per_second": tokens_per_second,
        "mfu": run_mfu(run, tokens_per_second),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "peak_memory_kind": "cuda_max_allocated" if accelerator.device.type == "cuda" else "process_max_rss",
        "skipped_steps": state.skipped_steps,
        "final_train_loss": state.last_train_loss,
        "final_validation_loss": state.last_validation_loss,
        "device": str(accelerator.device),
        "precision": precision_name(accelerator.mixed_precision),
        "versions": runtime_versions(),
    }


def runtime_versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    from studykit import __version__
    from studykit.runtime import code_version

    return {"studykit": __version__, "code": code_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__}


def full_model(model) -> tuple[Any, dict]:
    """Full fine-tuning: every weight trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, {"adapted_modules": [], "base_params": sum(p.numel() for p in model.parameters())}


def lora_wrapper(config) -> Callable[[Any], tuple[Any, dict]]:
    from studykit.modeling import adapted_module_names, strip_peft_prefix, wrap_with_lora

    def wrap(model) -> tuple[Any, dict]:
        base_params = sum(p.numel() for p in model.parameters())
        model = wrap_with_lora(model, config.rank, config.alpha, config.dropout, config.target_modules, config.use_rslora, config.use_dora)
        adapted = [strip_peft_prefix(name) for name in adapted_module_names(model)]
        lora = {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout, "target_modules": config.target_modules,
                "use_rslora": config.use_rslora, "use_dora": config.use_dora, "loraplus_lr_ratio": config.loraplus_lr_ratio}
        return model, {"adapted_modules": adapted, "base_params": base_params, "lora": lora}

    return wrap
