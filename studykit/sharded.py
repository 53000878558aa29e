"""Resumable state of a model sharded by FSDP: gathered whole to be saved, spread back over the shards to resume.

Under FSDP each process holds a slice of every weight and of its optimizer state, so a checkpoint cannot be
written by the main process alone (it would wait forever for the others to hand over their slices). Every
process joins the gather; the whole state lands on the main process's CPU, keyed by parameter name, and the
weights are written with save_pretrained like any other checkpoint, so they still load with transformers or peft.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Whole tensors, on the CPU, on the main process only: the other processes get empty dicts.
WHOLE_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every process reads the same whole state and keeps its own slice. Frozen and tied weights may be absent.
FROM_WHOLE = StateDictOptions(full_state_dict=True, strict=False)


def gather_weights(model) -> dict[str, Any]:
    """The model's weights, whole, on the main process. Every process must call this."""
    return get_model_state_dict(model, options=WHOLE_ON_MAIN)


def gather_optimizer_state(model, optimizer) -> dict[str, Any] | None:
    """The optimizer state, whole and keyed by parameter name, on the main process. Every process must call this.

    Before the optimizer's first step there is no state to save (None): gathering would make one up with a step
    at learning rate 0, which would still count as a step in AdamW's bias correction after resuming."""
    return get_optimizer_state_dict(model, optimizer, options=WHOLE_ON_MAIN) if optimizer.state else None


def scatter_state(model, optimizer, weights: dict[str, Any], optimizer_state: dict[str, Any] | None) -> list[str]:
    """Load whole weights (keyed by the model's parameter names) and optimizer state into the shards; returns the
    names of trainable parameters the weights lacked. Every process must call this."""
    set_model_state_dict(model, weights, options=FROM_WHOLE)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=FROM_WHOLE)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and name not in weights]


def by_parameter_name(model, saved: dict[str, Any], adapter_name: str | None = None) -> dict[str, Any]:
    """Weights as save_pretrained wrote them, keyed by the model's own parameter names.

    A full model's names are the same. peft leaves the adapter's name out of the keys it saves
    (`...c_attn.lora_A.weight` for the parameter `...c_attn.lora_A.default.weight`; DoRA's
    `...lora_magnitude_vector.default.weight` is saved as `...lora_magnitude_vector`), and puts it back on load."""
    if adapter_name is None:
        return dict(saved)
    marker = f".{adapter_name}."
    renamed = {}
    for name, _ in model.named_parameters():
        saved_name = name.replace(marker, ".", 1)
        for candidate in (saved_name, saved_name.removesuffix(".weight")):
            if candidate in saved:
                renamed[name] = saved[candidate]
                break
    return renamed
