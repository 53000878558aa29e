"""Next-token NLL of a batch, summed over its predicted positions: the training loss and the evaluation score.

The output layer is applied to a chunk of predicted positions at a time, so the batch x length x vocabulary logits
never exist. At GPT-2 Small's defaults (8 x 512 tokens, fp16) they and the loss's fp32 copies of them were 2.3 of the
5.6 GiB a full fine-tuning step needed; a chunk is a fraction of that. Padding positions never reach the output layer.

Three kernels do this job (`--loss-kernel`): this module's own (`studykit`), torch's
`torch.nn.functional.linear_cross_entropy` in its chunked form (`torch`, torch 2.13 and later) and Liger's Triton
kernel (`liger`, CUDA only, where liger-kernel is installed). The choice travels with the model (use_loss_kernel), so
every caller of batch_nll (training, validation, the memory probe, evaluation) computes the loss the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from studykit.config import LOSS_KERNELS
from studykit.data import IGNORE_INDEX
from studykit.errors import UserError

# Every chunk reads and writes the whole fp32 gradient of the output weights (vocabulary x width), so chunks must be
# large enough to amortise that: on a 2-core CPU, GPT-2 Small's output layer and loss (1,024 positions, full FT) ran at
# 72 GFLOP/s with 667 positions a chunk (128 MiB of logits) against 51 with 83 (16 MiB); 1,335 gained nothing more.
# (Small chunks were faster only while each chunk allocated fresh tensors, which a reused buffer no longer does.)
# A GPU wants large chunks to keep its kernels busy.
LOGIT_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 200 * 2**20}


def logit_chunk_positions(vocab_size: int, device_type: str) -> int:
    budget = LOGIT_CHUNK_BYTES.get(device_type, LOGIT_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * vocab_size))  # fp32: the loss is computed on upcast logits


def token_nll_per_sequence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL for each row of full logits; positions labelled IGNORE_INDEX (padding) contribute nothing.

    The labels are shifted, not the logits: slicing off the last position would copy the whole
    batch x length x vocabulary tensor (the largest one of the step) before the loss reads it.
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        next_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(labels.shape).sum(dim=1)


def output_layer(model) -> Optional[torch.nn.Linear]:
    """The model's output layer if the chunked loss can apply it itself (a linear layer without bias, as in GPT-2)."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) and head.bias is None else None


class ChunkedOutputLayerNLL(torch.autograd.Function):
    """NLL of `targets` under softmax(hidden @ weight.T), one chunk of positions at a time.

    As in Liger's fused linear cross-entropy, the gradients are worked out chunk by chunk during the forward pass,
    while each chunk's logits exist; backward only scales them. Recomputing the logits in backward instead would
    cost one more output-layer matmul per chunk. Returns the total (differentiable) and each position's NLL.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, needs_hidden_grad, needs_weight_grad):
        positions, vocab_size = targets.numel(), weight.size(0)
        chunk_positions = max(1, min(logit_chunk_positions(vocab_size, hidden.device.type), positions))
        nll = torch.empty(positions, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight_grad else None
        # Cast once, not per chunk: autocast caches casts of trainable weights only, and a LoRA base is frozen.
        compute_weight = weight.to(compute_dtype)
        # One buffer for every chunk's logits (and one for their half-precision product and gradient): a fresh
        # tensor per chunk was paged in anew each time on a CPU.
        logits_buffer = torch.empty(chunk_positions, vocab_size, dtype=torch.float32, device=hidden.device)
        product_buffer = logits_buffer
        if compute_dtype != torch.float32:
            product_buffer = torch.empty_like(logits_buffer, dtype=compute_dtype)
        rows = torch.arange(chunk_positions, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, positions, chunk_positions):
                chunk = slice(start, start + chunk_positions)
                chunk_hidden, chunk_targets = hidden[chunk].to(compute_dtype), targets[chunk]
                size = chunk_targets.numel()
                logits, product = logits_buffer[:size], product_buffer[:size]
                torch.mm(chunk_hidden, compute_weight.T, out=product)
                if product is not logits:
                    logits.copy_(product)
                # Softmax in place with one exp per logit: shift by the row's maximum, exponentiate, normalise.
                # The NLL is log(sum exp(shifted)) - shifted[target], so the maximum cancels.
                logits.sub_(logits.amax(dim=1, keepdim=True))
                shifted_target = logits.gather(1, chunk_targets[:, None]).squeeze(1)
                normalizer = logits.exp_().sum(dim=1)
                nll[chunk] = normalizer.log() - shifted_target
                if grad_hidden is not None or grad_weight is not None:
                    # d nll / d logits = softmax - one_hot(target), built in place of the logits.
                    grad_logits = logits.mul_(normalizer.reciprocal_()[:, None])
                    grad_logits[rows[:size], chunk_targets] -= 1
                    if product is not logits:
                        grad_logits = product.copy_(grad_logits)
                    if grad_hidden is not None:
                        accumulate_product(grad_hidden[chunk], grad_logits, compute_weight, replace=True)
                    if grad_weight is not None:
                        accumulate_product(grad_weight, grad_logits.T, chunk_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(nll)
        return nll.sum(), nll

    @staticmethod
    def backward(ctx, grad_total, _grad_nll):
        # Scaled in place: a scaled copy of the output weights' gradient was a second vocabulary x width tensor at the
        # step's peak. A second backward (retain_graph=True) is refused by autograd's check on the saved tensors.
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled_hidden = grad_hidden.mul_(grad_total) if grad_hidden is not None else None
        scaled_weight = grad_weight.mul_(grad_total) if grad_weight is not None else None
        return scaled_hidden, scaled_weight, None, None, None, None


def accumulate_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, replace: bool = False) -> None:
    """`out` += left @ right (or = with `replace`), written straight into `out` where the dtypes allow: a separate
    product and an add made and read a vocabulary x width temporary per chunk for the output weights' gradient
    (154 MB at GPT-2 Small), and made the fp32 loss 1.4x slower on a CPU. Half-precision products into fp32 still
    go through one (a CPU has no mixed-dtype matmul)."""
    if left.dtype != out.dtype:
        product = left @ right
        out.copy_(product) if replace else out.add_(product)
    elif replace:
        torch.mm(left, right, out=out)
    else:
        torch.addmm(out, left, right, out=out)  # rather than addmm_, which torch's FLOP counter does not count


# What --loss-kernel auto runs; the measurements behind the choice are in docs/speed.md, "The loss kernel".
AUTO_LOSS_KERNEL = "studykit"
# Where use_loss_kernel records the choice on a model; a plain attribute, so save_pretrained never writes it.
LOSS_KERNEL_ATTRIBUTE = "studykit_loss_kernel"


def torch_has_fused_loss() -> bool:
    """torch.nn.functional.linear_cross_entropy with chunking options: torch 2.13 and later."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def resolve_loss_kernel(choice: str, device_type: str) -> str:
    """The kernel a --loss-kernel choice runs on this device; a choice this machine cannot run is a UserError."""
    if choice not in LOSS_KERNELS:
        raise ValueError(f"unknown loss kernel {choice!r}")
    if choice == "auto":
        return AUTO_LOSS_KERNEL
    if choice == "torch" and not torch_has_fused_loss():
        raise UserError(
            f"--loss-kernel torch needs torch.nn.functional.linear_cross_entropy, which torch "
            f"{torch.__version__} lacks (it came in 2.13); upgrade torch or use --loss-kernel auto."
        )
    if choice == "liger":
        if device_type != "cuda":
            raise UserError(
                f"--loss-kernel liger needs a CUDA GPU (Liger's kernels are written in Triton) and this "
                f"run is on {device_type}; use --loss-kernel auto."
            )
        missing = [name for name in ("liger_kernel", "triton") if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(
                f"--loss-kernel liger needs the {' and '.join(missing)} package, which is not installed; "
                "pip install liger-kernel, or use --loss-kernel auto."
            )
    return choice


def use_loss_kernel(model, kernel: str) -> None:
    """Make every batch_nll on `model` (or on its DDP or torch.compile wrapper) use this resolved kernel."""
    setattr(_unwrapped(model), LOSS_KERNEL_ATTRIBUTE, kernel)


def loss_kernel_of(model) -> str:
    return getattr(_unwrapped(model), LOSS_KERNEL_ATTRIBUTE, AUTO_LOSS_KERNEL)


def _unwrapped(model):
    inner = getattr(model, "module", model)  # DDP
    return getattr(inner, "_orig_mod", inner)  # torch.compile


def output_layer_nll(
    kernel: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    compute_dtype: torch.dtype,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The summed NLL of `targets` under softmax(hidden @ weight.T) (differentiable) and, where the kernel gives them
    without extra work, each position's NLL (fp32, detached). Without gradients every kernel gives them; with them
    torch's and Liger's kernels return the total only, since their per-position form recomputes the logits in
    backward (one more output-layer matmul per chunk)."""
    if kernel == "studykit":
        return ChunkedOutputLayerNLL.apply(hidden, weight, targets, compute_dtype, needs_hidden_grad, needs_weight_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        if needs_hidden_grad or needs_weight_grad:
            return library_nll(kernel, hidden, weight, targets, "sum").float(), None
        nll = library_nll(kernel, hidden, weight, targets, "none").float()
    return nll.sum(), nll


def library_nll(
    kernel: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str
) -> torch.Tensor:
    """torch's or Liger's fused linear cross-entropy ("sum": the total, its gradients made in forward; "none": each
    position's NLL), in the dtype of `hidden` and `weight`."""
    if kernel == "torch":
        # The same chunks as studykit's kernel, so the two hold the same memory.
        chunk_positions = logit_chunk_positions(weight.size(0), hidden.device.type)
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_positions)
        return F.linear_cross_entropy(hidden, weight, targets, reduction=reduction, options=options)
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    raise ValueError(f"unknown loss kernel {kernel!r}")


@dataclass
class BatchNLL:
    total: torch.Tensor  # fp32 scalar; backward from it trains the model
    # float64, one sum per row, detached. None when training with a kernel that gives the total only (torch, liger):
    # training reads the total alone, and evaluation, which needs these, computes no gradients.
    per_sequence: Optional[torch.Tensor]


def batch_nll(
    model, batch: dict[str, torch.Tensor], autocast_context: Callable[[], contextlib.AbstractContextManager]
) -> BatchNLL:
    """Summed next-token NLL of a collated batch (padding labelled IGNORE_INDEX never counts; EOS does).

    The model returns its final, normalised hidden states (`logits_to_keep=1` spares the full logits) and the output
    layer is applied here, by the model's loss kernel (use_loss_kernel), only at positions that have a target. A model
    whose output layer is not a plain bias-free linear layer gets the usual full logits instead.
    """
    head = output_layer(model)
    labels = batch["labels"]
    if head is None:
        with autocast_context():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sequence = token_nll_per_sequence(logits, labels)
        return BatchNLL(per_sequence.sum(), per_sequence.detach().double())
    with autocast_context():
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
        )
        final_hidden = outputs.hidden_states[-1]
        del outputs  # the other layers' hidden states and the last position's logits are not needed
        positions = batch["predicted_positions"] if "predicted_positions" in batch else predicted_positions(labels)
        hidden = final_hidden.reshape(-1, final_hidden.size(-1)).index_select(0, positions)
        targets = labels.reshape(-1).index_select(0, positions + 1)  # the next token, in the same row
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        grad_enabled = torch.is_grad_enabled()
        total, nll = output_layer_nll(
            loss_kernel_of(model),
            hidden,
            head.weight,
            targets,
            compute_dtype,
            grad_enabled and hidden.requires_grad,
            grad_enabled and head.weight.requires_grad,
        )
    if nll is None:
        return BatchNLL(total, None)
    per_sequence = torch.zeros(labels.size(0), dtype=torch.float64, device=labels.device)
    per_sequence.index_add_(0, positions // labels.size(1), nll.detach().double())
    return BatchNLL(total, per_sequence)


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices, into the batch x length grid, of the positions whose next token is a target, in row order.

    Where the batch was collated by batching.collate_padded they come with it, worked out on the host: found here on
    a GPU, their number would make the host wait for the device before the loss (and again for the per-row sums).
    """
    has_target = labels[:, 1:] != IGNORE_INDEX
    rows, columns = has_target.nonzero(as_tuple=True)
    return rows * labels.size(1) + columns
