"""The optimizers a run can train with, as data: torch's AdamW (the default), bitsandbytes' 8-bit AdamW, and its
paged variant, whose state lives in CUDA unified memory that the driver moves to CPU memory when the GPU needs the
room. All three take the method's parameter groups (weight decay, LoRA+ learning rates) with the same betas and eps
and compute AdamW's decoupled update; the 8-bit ones keep both moments quantised block-wise (Dettmers et al. 2022).
The memory estimate asks here how many bytes each keeps per parameter, and where.

bitsandbytes rather than torchao: its 8-bit AdamW runs on CUDA and (0.50.2, tested here) on a CPU without
compiling anything, its state is plain uint8 and fp32 tensors that a checkpoint loads with
torch.load(weights_only=True), and its update reads the gradients at `step()`, after clipping and the fp16 loss
scaler's unscaling. torchao's AdamW8bit compiles
its update with torch.compile on first use (24 s for two layers on this kit's 2-core CPU) and keeps tensor-subclass
state; its CPUOffloadOptimizer copies gradients to the CPU in backward hooks, before the trainer clips or unscales
them, so a run would silently train without clipping (and on fp16, on scaled gradients).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from studykit.config import TrainConfig
from studykit.errors import UserError, first_line

# bitsandbytes quantises each moment in blocks of 256 values, each block with an fp32 absolute maximum.
BNB_BLOCK_SIZE = 256
# Tensors with fewer values keep fp32 moments (bitsandbytes' min_8bit_size: too small to be worth quantising).
BNB_MIN_8BIT_SIZE = 4096
# The paged optimizer pages only moments of at least this many values; smaller ones stay in ordinary GPU memory.
BNB_MIN_PAGED_SIZE = 100_000
FP32_BYTES = 4
# What methods.Method.parameter_groups gives: weight decay and learning rate per group.
ParameterGroups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    # What the memory estimate calls its state.
    state_description: str
    # The package it needs beyond torch, or None.
    library: Optional[str]
    # Paging between GPU and CPU memory means nothing without a GPU.
    cuda_only: bool
    # (parameter groups, config, device) -> the optimizer.
    build: Callable[[ParameterGroups, TrainConfig, torch.device], torch.optim.Optimizer]
    # A tensor of n values -> (bytes of its state in GPU memory, bytes in memory the driver may page to the CPU).
    state_bytes_of_tensor: Callable[[int], tuple[int, int]]


def adamw_state_bytes(values: int) -> tuple[int, int]:
    return 2 * FP32_BYTES * values, 0


def adamw8bit_state_bytes(values: int) -> tuple[int, int]:
    """Two uint8 moments and one fp32 absmax per block of each; fp32 moments for a small tensor."""
    if values < BNB_MIN_8BIT_SIZE:
        return 2 * FP32_BYTES * values, 0
    return 2 * (values + FP32_BYTES * math.ceil(values / BNB_BLOCK_SIZE)), 0


def paged_adamw8bit_state_bytes(values: int) -> tuple[int, int]:
    """8-bit moments of a large tensor are paged; their absmax blocks, and small tensors' moments, are not."""
    on_gpu, _ = adamw8bit_state_bytes(values)
    if values < BNB_MIN_PAGED_SIZE:
        return on_gpu, 0
    return 2 * FP32_BYTES * math.ceil(values / BNB_BLOCK_SIZE), 2 * values


def build_adamw(groups: ParameterGroups, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # Fused: one kernel for every parameter on CUDA. A CPU keeps the for-each implementation the golden numbers pin.
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=device.type == "cuda",
    )


def build_adamw8bit(groups: ParameterGroups, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    bitsandbytes = import_bitsandbytes()
    return bitsandbytes.optim.AdamW8bit(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        min_8bit_size=BNB_MIN_8BIT_SIZE,
    )


def build_paged_adamw8bit(groups: ParameterGroups, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    bitsandbytes = import_bitsandbytes()

    class PagedAdamW8bit(bitsandbytes.optim.PagedAdamW8bit):
        """bitsandbytes' paged 8-bit AdamW whose loaded state is paged again. Its own load_state_dict moves the saved
        moments into ordinary GPU memory, so a resumed run would need the room that paging saves."""

        def load_state_dict(self, state_dict, move_to_device=True):
            # Left on the CPU here; the first step moves what is not paged to the GPU (bitsandbytes' to_gpu).
            super().load_state_dict(state_dict, move_to_device=False)
            for parameter, state in self.state.items():
                for key in ("state1", "state2"):
                    loaded = state.get(key)
                    if isinstance(loaded, torch.Tensor) and not getattr(loaded, "is_paged", False):
                        paged = self.get_state_buffer(parameter, dtype=loaded.dtype)
                        if getattr(paged, "is_paged", False):
                            paged.copy_(loaded)
                            state[key] = paged

    return PagedAdamW8bit(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        min_8bit_size=BNB_MIN_8BIT_SIZE,
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", "AdamW, 2 x fp32", None, False, build_adamw, adamw_state_bytes),
    "adamw8bit": OptimizerSpec(
        "adamw8bit", "8-bit AdamW, uint8 + scales", "bitsandbytes", False, build_adamw8bit, adamw8bit_state_bytes
    ),
    "paged-adamw8bit": OptimizerSpec(
        "paged-adamw8bit",
        "paged 8-bit, scales on GPU",
        "bitsandbytes",
        True,
        build_paged_adamw8bit,
        paged_adamw8bit_state_bytes,
    ),
}
# The update steps of bitsandbytes' AdamW8bit: 8-bit moments, and fp32 ones for small tensors.
BNB_UPDATE_OPS = ("bitsandbytes::optimizer_update_8bit_blockwise", "bitsandbytes::optimizer_update_32bit")


def import_bitsandbytes():
    # (studykit/__init__.py quiets the warning bitsandbytes gives at import on some CPUs.)
    try:
        import bitsandbytes
    except (ImportError, OSError, RuntimeError) as error:
        raise UserError(
            f"bitsandbytes is installed but does not load ({first_line(error)}); reinstall it for this "
            "torch (pip install --force-reinstall --no-deps bitsandbytes), or use --optimizer adamw."
        ) from None
    return bitsandbytes


def check_runs_here(name: str, device: torch.device) -> None:
    """An optimizer this machine cannot run is refused in one sentence before anything is built."""
    spec = OPTIMIZERS[name]
    if spec.library is not None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # FSDP gathers and spreads optimizer state by parameter name in the parameters' shapes (studykit/sharded.py);
        # bitsandbytes' block scales have shapes of their own.
        raise UserError(
            f"--optimizer {name} does not run under FSDP; use --optimizer adamw, or DDP (a config "
            "without FSDP), whose processes each hold the whole 8-bit state."
        )
    if spec.cuda_only and device.type != "cuda":
        raise UserError(
            f"--optimizer {name} pages its state between GPU and CPU memory, which needs a CUDA GPU; "
            f"on {device.type} use --optimizer adamw8bit (as little state, in ordinary memory) or adamw."
        )
    if spec.library is None:
        return
    if importlib.util.find_spec(spec.library) is None:
        raise UserError(
            f"--optimizer {name} needs {spec.library}, which is not installed; pip install {spec.library} "
            "(0.50.2 and later run on a CPU too), or use --optimizer adamw."
        )
    bitsandbytes = import_bitsandbytes()
    dispatch_key = "CUDA" if device.type == "cuda" else device.type.upper()
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key) for op in BNB_UPDATE_OPS):
        raise UserError(
            f"--optimizer {name}: this bitsandbytes ({bitsandbytes.__version__}) has no 8-bit optimizer "
            f"for {device.type}; pip install -U bitsandbytes (0.50.2 and later run on a CPU too), or use "
            "--optimizer adamw."
        )


def build_optimizer(groups: ParameterGroups, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The config's optimizer over the method's parameter groups, on this device."""
    check_runs_here(config.optimizer, device)
    return OPTIMIZERS[config.optimizer].build(groups, config, device)


def optimizer_state_bytes(name: str, tensor_sizes: Sequence[int]) -> tuple[int, int]:
    """The state of trainable tensors of these sizes: (bytes in GPU memory, bytes the driver may page to the CPU)."""
    per_tensor = [OPTIMIZERS[name].state_bytes_of_tensor(size) for size in tensor_sizes]
    return sum(gpu for gpu, _ in per_tensor), sum(paged for _, paged in per_tensor)
