"""How much accelerator memory a training run needs, a cap on it, and the largest micro-batch that fits.

The estimate is derived from the model's config, its trainable tensors and the optimizer's state per tensor
(studykit/optimizers.py), so it holds for full fine-tuning and LoRA of any causal LM with a GPT-style block (hidden
size, layers, heads, MLP width, vocabulary) and for each optimizer.
It is an estimate of what PyTorch's caching allocator holds at the peak of a step, not a measurement: the CUDA
context (a few hundred MB) and allocator fragmentation come on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from studykit.errors import UserError
from studykit.loss import logit_chunk_positions, output_layer
from studykit.modeling import count_parameters, known_gpt2_config, model_skeleton
from studykit.optimizers import OPTIMIZERS, optimizer_state_bytes
from studykit.runtime import precision_name

GIB = 1024**3
FP32_BYTES = 4
# What to try, in the order that costs least: the flags named when a run does not fit.
MEMORY_FLAGS = (
    "--batch-size (smaller), --grad-accum (larger, keeps the effective batch), --gradient-checkpointing, --auto-batch"
)


@dataclass
class ModelShape:
    """The sizes that activations scale with, read from a Hugging Face model config."""

    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
        intermediate = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(
            hidden,
            int(config.num_hidden_layers),
            int(config.num_attention_heads),
            int(intermediate),
            int(config.vocab_size),
        )


@dataclass
class MemoryEstimate:
    """Bytes at the peak of one optimizer step, by what holds them."""

    micro_batch: int
    seq_len: int
    precision: str
    gradient_checkpointing: bool
    weights: int
    half_precision_weight_copies: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_other_setting: int
    loss: int
    chunked_loss: bool = True
    optimizer: str = "adamw"
    # Paged optimizer state: in memory the CUDA driver moves to the CPU when the GPU needs the room, so not counted
    # in the total (what the GPU must hold).
    optimizer_state_paged: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.half_precision_weight_copies
            + self.gradients
            + self.optimizer_state
            + self.activations
            + self.loss
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}

    def describe(self) -> str:
        other = "without" if self.gradient_checkpointing else "with"
        this = "with" if self.gradient_checkpointing else "without"
        rows = [
            ("weights (fp32)", self.weights),
            ("half-precision weight copies (autocast)", self.half_precision_weight_copies),
            ("gradients (fp32, trainable only)", self.gradients),
            (f"optimizer state ({OPTIMIZERS[self.optimizer].state_description})", self.optimizer_state),
            (f"activations {this} gradient checkpointing", self.activations),
            (
                "output layer and loss (chunked logits)"
                if self.chunked_loss
                else "logits, log-probabilities and their gradient",
                self.loss,
            ),
        ]
        lines = [
            f"memory estimate at micro-batch {self.micro_batch} x {self.seq_len} tokens, precision {self.precision}:"
        ]
        lines += [f"  {name:<46} {gib(size):>8.2f} GiB" for name, size in rows]
        lines.append(f"  {'total':<46} {gib(self.total):>8.2f} GiB")
        lines.append(f"  (activations {other} gradient checkpointing: {gib(self.activations_other_setting):.2f} GiB)")
        if self.optimizer_state_paged:
            lines.append(
                f"  (and {gib(self.optimizer_state_paged):.2f} GiB of paged optimizer state, which the CUDA "
                "driver keeps in CPU memory when the GPU needs the room)"
            )
        return "\n".join(lines)


def gib(size: float) -> float:
    return size / GIB


def compute_bytes(precision: str) -> int:
    """Bytes per activation element: 2 under 'fp16' or 'bf16' autocast, else 4."""
    return 2 if precision in ("fp16", "bf16") else FP32_BYTES


def activation_bytes_per_token(
    shape: ModelShape,
    precision: str,
    gradient_checkpointing: bool,
    attention_scores_kept: bool,
    seq_len: int,
    adapter_dropout_features: int = 0,
    device_type: str = "cuda",
) -> float:
    """Per token, summed over layers, what autograd keeps for the backward pass.

    Without checkpointing each block keeps (Korthikanti et al. 2022, generalised to any MLP width) the inputs of
    its matmuls and norms: 8h + 2m elements (h: hidden, m: MLP width) plus one byte per element of its two dropout
    masks; attention computed step by step keeps its heads x seq_len probabilities, dropout mask and dropped
    probabilities (a dropout mask is a byte per element on CUDA, a full element on a CPU); SDPA's kernels do not.
    With checkpointing only each block's input survives (kept in fp32 by the residual stream), and one block's
    activations are rebuilt at a time during the backward pass.
    LoRA dropout keeps, for each adapted layer, a dropped copy of its input (fp32 at most), the mask (a byte per
    element) and the half-precision cast the adapter multiplies: `adapter_dropout_features` sums their inputs' widths.
    """
    element = compute_bytes(precision)
    block = element * (8 * shape.hidden_size + 2 * shape.intermediate_size) + 2 * shape.hidden_size
    block += adapter_dropout_features * (FP32_BYTES + 1 + element) / shape.layers
    if attention_scores_kept:
        block += (2 * element + (1 if device_type == "cuda" else element)) * shape.heads * seq_len
    if gradient_checkpointing:
        return shape.layers * FP32_BYTES * shape.hidden_size + block
    return shape.layers * block


def loss_bytes(
    shape: ModelShape,
    precision: str,
    tokens: int,
    chunked: bool,
    output_layer_trainable: bool,
    device_type: str = "cuda",
) -> int:
    """The output layer and the loss at their peak.

    Chunked (studykit.loss): one chunk's fp32 logits, which become their gradient in place, beside a half-precision
    copy; the output weights' gradient, accumulated in fp32 over the chunks until backward, with each chunk's
    contribution; a half-precision copy of the output weights; the fp32 gradient for the final hidden states.
    Full logits (an output layer the chunked loss cannot apply): log-softmax's backward, where the fp32
    log-probabilities, the gradient arriving from the loss and the gradient handed back are alive at once.
    """
    if not chunked:
        return tokens * shape.vocab_size * 3 * FP32_BYTES
    element = compute_bytes(precision)
    half_copy = element if element < FP32_BYTES else 0
    output_weights = shape.vocab_size * shape.hidden_size
    chunk = min(tokens, logit_chunk_positions(shape.vocab_size, device_type))
    logits = chunk * shape.vocab_size * (FP32_BYTES + half_copy)
    weight_gradient = output_weights * (FP32_BYTES + element) if output_layer_trainable else 0
    return logits + weight_gradient + output_weights * half_copy + tokens * shape.hidden_size * FP32_BYTES


def estimate_training_memory(
    model_config: Any,
    total_params: int,
    trainable_params: int,
    micro_batch: int,
    seq_len: int,
    precision: str,
    gradient_checkpointing: bool,
    attention_scores_kept: bool = False,
    chunked_loss: bool = True,
    output_layer_trainable: bool = True,
    adapter_dropout_features: int = 0,
    device_type: str = "cuda",
    optimizer: str = "adamw",
    trainable_tensor_sizes: Optional[Sequence[int]] = None,
) -> MemoryEstimate:
    """Full fine-tuning: trainable == total. LoRA: trainable is the adapters, the frozen base has no gradients
    or optimizer state. Weights stay fp32 under mixed precision; autocast caches half-precision copies. The
    optimizer's state depends on the sizes of the trainable tensors (an 8-bit optimizer keeps small ones in fp32);
    without them, the trainable parameters count as one tensor."""
    shape = ModelShape.from_config(model_config)
    optimizer_state, optimizer_state_paged = optimizer_state_bytes(
        optimizer, trainable_tensor_sizes or [trainable_params]
    )
    tokens = micro_batch * seq_len
    per_token = {
        setting: activation_bytes_per_token(
            shape, precision, setting, attention_scores_kept, seq_len, adapter_dropout_features, device_type
        )
        for setting in (True, False)
    }
    return MemoryEstimate(
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        weights=FP32_BYTES * total_params,
        half_precision_weight_copies=2 * total_params if compute_bytes(precision) == 2 else 0,
        gradients=FP32_BYTES * trainable_params,
        optimizer_state=optimizer_state,
        activations=int(tokens * per_token[gradient_checkpointing]),
        activations_other_setting=int(tokens * per_token[not gradient_checkpointing]),
        loss=loss_bytes(shape, precision, tokens, chunked_loss, output_layer_trainable, device_type),
        chunked_loss=chunked_loss,
        optimizer=optimizer,
        optimizer_state_paged=optimizer_state_paged,
    )


def estimate_for_model(
    model,
    micro_batch: int,
    seq_len: int,
    precision: str,
    gradient_checkpointing: bool,
    device_type: str = "cuda",
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """The estimate for a loaded (possibly LoRA-wrapped) model, counting its trainable parameters."""
    trainable, total = count_parameters(model)
    config = model.config
    # On a CPU, SDPA with attention dropout falls back to the step-by-step computation, as eager attention is.
    attention_dropout = float(getattr(config, "attn_pdrop", None) or getattr(config, "attention_dropout", None) or 0.0)
    scores_kept = getattr(config, "_attn_implementation", None) == "eager" or (
        device_type == "cpu" and attention_dropout > 0
    )
    head = output_layer(model)
    return estimate_training_memory(
        config,
        total,
        trainable,
        micro_batch,
        seq_len,
        precision,
        gradient_checkpointing,
        scores_kept,
        chunked_loss=head is not None,
        output_layer_trainable=head is not None and head.weight.requires_grad,
        adapter_dropout_features=adapter_dropout_features(model),
        device_type=device_type,
        optimizer=optimizer,
        trainable_tensor_sizes=[p.numel() for p in model.parameters() if p.requires_grad],
    )


def adapter_dropout_features(model) -> int:
    """The summed input widths of the LoRA-adapted layers whose adapter applies dropout."""
    features = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and any(
            isinstance(d, torch.nn.Dropout) and d.p > 0 for d in dropouts.values()
        ):
            features += int(module.in_features)
    return features


class TensorMemoryPeak(TorchDispatchMode):
    """The most bytes tensors held at once while inside, on any device: `already_alive` (the weights) count from the
    start, every tensor made inside from its first op until its storage is freed. What a step really keeps, without
    a GPU; the allocator's rounding and the CUDA context are not in it."""

    def __init__(self, already_alive=()) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        for tensor in already_alive:
            self._count(tensor)
        self.peak = self.current

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.alive:
            self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for key in [key for key, (storage, _) in self.alive.items() if storage.expired()]:
            self.current -= self.alive.pop(key)[1]
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        self.peak = max(self.peak, self.current)
        return result


def apply_memory_cap(max_gpu_memory_gb: Optional[float], device: torch.device, say=print) -> Optional[int]:
    """Limit this process's CUDA allocator to the cap; returns the cap in bytes (None when off)."""
    if max_gpu_memory_gb is None:
        return None
    cap = int(max_gpu_memory_gb * GIB)
    if device.type != "cuda":
        say(
            f"note: --max-gpu-memory-gb {max_gpu_memory_gb:g} only applies to CUDA; on {device.type} it only guides "
            "--auto-batch."
        )
        return cap
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    say(f"GPU memory capped at {max_gpu_memory_gb:g} GiB ({fraction:.1%} of {gib(total):.1f} GiB)")
    return cap


def smaller_micro_batch(batch_size: int, effective_batch: int) -> Optional[int]:
    """The next micro-batch to try: about half, and a divisor of the effective batch so that it is kept exactly."""
    for candidate in range(batch_size // 2, 0, -1):
        if effective_batch % candidate == 0:
            return candidate
    return None


def with_micro_batch(config, batch_size: int):
    """The same config with another micro-batch; gradient accumulation grows so the effective batch is unchanged."""
    return dataclasses.replace(config, batch_size=batch_size, grad_accum=config.effective_batch // batch_size)


def largest_fitting_by_estimate(config, estimate_at, cap: Optional[int]) -> int:
    """CPU: the largest micro-batch whose estimate is within the cap (the configured one when there is no cap)."""
    batch_size = config.batch_size
    while cap is not None and estimate_at(batch_size).total > cap:
        smaller = smaller_micro_batch(batch_size, config.effective_batch)
        if smaller is None:
            break
        batch_size = smaller
    return batch_size


def probe_fits(model, accelerator, sequence: list[int], batch_size: int, reserved_bytes: int) -> bool:
    """One forward and backward pass at the longest length, with the optimizer state's memory held aside."""
    from studykit.data import collate
    from studykit.loss import batch_nll

    batch = {key: value.to(accelerator.device) for key, value in collate([sequence] * batch_size, 0).items()}
    try:
        # The probe must not move the run's random streams (dropout), so the run is the same with or without it.
        device = accelerator.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            reserve = torch.empty(reserved_bytes, dtype=torch.uint8, device=accelerator.device)
            with accelerator.no_sync(model):
                batch_nll(model, batch, accelerator.autocast).total.backward()
            del reserve
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def largest_fitting_by_probe(config, model, accelerator, longest_sequence: list[int], optimizer_bytes: int) -> int:
    """CUDA: halve the micro-batch until a real step at the longest length fits; every process agrees on the
    smallest."""
    batch_size = config.batch_size
    while not probe_fits(model, accelerator, longest_sequence, batch_size, optimizer_bytes):
        smaller = smaller_micro_batch(batch_size, config.effective_batch)
        if smaller is None:
            raise UserError(
                f"even a micro-batch of {batch_size} sequences of {len(longest_sequence)} tokens runs out of GPU "
                "memory; use --gradient-checkpointing, LoRA, or a larger --max-gpu-memory-gb."
            )
        batch_size = smaller
    chosen = accelerator.gather(torch.tensor([batch_size], device=accelerator.device))
    return int(chosen.min())


def plan_memory(config, model, accelerator, longest_sequence: list[int]) -> tuple[Any, dict[str, Any]]:
    """Cap memory, pick the micro-batch (--auto-batch), print the estimate; returns the config to train with and
    the record for run.json."""
    seq_len = len(longest_sequence)
    precision = precision_name(accelerator.mixed_precision)

    def estimate_at(batch_size: int) -> MemoryEstimate:
        return estimate_for_model(
            accelerator.unwrap_model(model),
            batch_size,
            seq_len,
            precision,
            config.gradient_checkpointing,
            accelerator.device.type,
            config.optimizer,
        )

    cap = apply_memory_cap(config.max_gpu_memory_gb, accelerator.device, accelerator.print)
    requested = (config.batch_size, config.grad_accum)
    if config.auto_batch:
        if accelerator.device.type == "cuda":
            batch_size = largest_fitting_by_probe(
                config, model, accelerator, longest_sequence, estimate_at(config.batch_size).optimizer_state
            )
        else:
            batch_size = largest_fitting_by_estimate(config, estimate_at, cap)
        config = with_micro_batch(config, batch_size)
        accelerator.print(
            f"--auto-batch: micro-batch {config.batch_size} x grad-accum {config.grad_accum} "
            f"(asked for {requested[0]} x {requested[1]}; the effective batch {config.effective_batch} is kept)"
        )
    estimate = estimate_at(config.batch_size)
    accelerator.print(estimate.describe())
    if cap is not None and estimate.total > cap:
        accelerator.print(
            f"warning: the estimate ({gib(estimate.total):.2f} GiB) exceeds --max-gpu-memory-gb; if the run "
            f"runs out of memory, try {MEMORY_FLAGS}."
        )
    record = {
        "estimate": estimate.to_dict(),
        "max_gpu_memory_gb": config.max_gpu_memory_gb,
        "auto_batch": config.auto_batch,
        "requested_batch_size": requested[0],
        "requested_grad_accum": requested[1],
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
    }
    return config, record


@contextlib.contextmanager
def out_of_memory_as_user_error(estimate: Optional[dict[str, Any]]) -> Iterator[None]:
    """A CUDA out-of-memory error during training becomes one sentence with the estimate and what to try."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        expected = (
            f"the estimate for this setting was {gib(estimate['total']):.2f} GiB at micro-batch "
            f"{estimate['micro_batch']}; "
            if estimate
            else ""
        )
        raise UserError(f"the GPU ran out of memory; {expected}try {MEMORY_FLAGS}.") from None


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
    from studykit.methods import method_of

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
