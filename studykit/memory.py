"""How much accelerator memory a training run needs, estimated (memory_fit.py caps it and picks the micro-batch that
fits; study_plan.py plans a study with it).

The estimate is derived from the model's config, its trainable tensors and the optimizer's state per tensor
(studykit/optimizers.py), so it holds for full fine-tuning and LoRA of any causal LM with a GPT-style block (hidden
size, layers, heads, MLP width, vocabulary) and for each optimizer.
It is an estimate of what PyTorch's caching allocator holds at the peak of a step, not a measurement: the CUDA
context (a few hundred MB) and allocator fragmentation come on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from studykit.loss import logit_chunk_positions, output_layer
from studykit.modeling import count_parameters
from studykit.optimizers import OPTIMIZERS, optimizer_state_bytes

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
