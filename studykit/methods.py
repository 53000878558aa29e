"""The training methods as data. Each entry says which config it takes, how it wraps the base model, what a token
costs it in FLOPs and how its parameters are grouped for the optimizer; nothing else in the kit branches on a
method's name. A third method is one more entry in METHODS (and a config class in config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from studykit.config import LoraTrainConfig, TrainConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[TrainConfig]
    # The command that trains with it, relative to the repository root (studykit.cli.train_method behind it).
    script: str
    # The base model -> (the model to train, what the run records about it: adapted modules, base parameters, settings).
    wrap: Callable[[Any, TrainConfig], tuple[Any, dict[str, Any]]]
    # Model FLOPs per trained token, in units of the total parameter count (see training_flops_per_token).
    flops_per_parameter: int
    # The optimizer's parameter groups (weight decay, learning rates).
    parameter_groups: Callable[[Any, TrainConfig], list[dict[str, Any]]]
    # The method in a report's words, from a finished run's record (its settings and what it adapted).
    describe: Callable[[Any], str]
    # The method the others are compared with, run by run and seed by seed (full fine-tuning).
    reference: bool = False
    # Checks the config against the base model's modules, built without weights on the meta device, so that a study
    # finds a run that cannot start before any run trains; raises a UserError. None: nothing to check.
    check_on_skeleton: Optional[Callable[[Any, TrainConfig], None]] = None
    # The top of its command's --help (studykit.cli); help text, left out of the training fingerprint.
    command_description: str = ""

    def flops_per_token(self, total_params: int) -> int:
        return self.flops_per_parameter * total_params


def decays(name: str, parameter) -> bool:
    """Weight decay applies to matrices only: never to biases or LayerNorm."""
    return parameter.ndim >= 2 and "ln_" not in name and "norm" not in name.lower()


def grouped(model, weight_decay: float, learning_rate: Callable[[str], float]) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (decays, learning rate), in the order the model lists them."""
    groups: dict[tuple[bool, float], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((decays(name, parameter), learning_rate(name)), []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr}
        for (decay, lr), params in groups.items()
    ]


def wrap_full(model, config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """Full fine-tuning: every weight trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, {"adapted_modules": [], "base_params": sum(p.numel() for p in model.parameters())}


def full_parameter_groups(model, config: TrainConfig) -> list[dict[str, Any]]:
    return grouped(model, config.weight_decay, lambda name: config.lr)


def describe_full(record) -> str:
    return "full FT"


def wrap_lora(model, config: LoraTrainConfig) -> tuple[Any, dict[str, Any]]:
    """LoRA: the base is frozen; adapters on the target modules train. The exact modules adapted are recorded."""
    from studykit.modeling import (
        adapted_module_names,
        strip_peft_prefix,
        wrap_with_lora,
    )

    base_params = sum(p.numel() for p in model.parameters())
    model = wrap_with_lora(
        model, config.rank, config.alpha, config.dropout, config.target_modules, config.use_rslora, config.use_dora
    )
    adapted = [strip_peft_prefix(name) for name in adapted_module_names(model)]
    lora = {
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "target_modules": config.target_modules,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "loraplus_lr_ratio": config.loraplus_lr_ratio,
    }
    return model, {"adapted_modules": adapted, "base_params": base_params, "lora": lora}


def describe_lora(record) -> str:
    lora = record.lora or {}
    variants = [label for label, on in (("rsLoRA", lora.get("use_rslora")), ("DoRA", lora.get("use_dora"))) if on]
    if lora.get("loraplus_lr_ratio"):
        variants.append(f"LoRA+ x{lora['loraplus_lr_ratio']:g}")
    targets = ",".join(lora.get("target_modules") or [])
    return f"LoRA r={lora.get('rank')} a={lora.get('alpha', 0):g} {targets}" + (
        f" ({', '.join(variants)})" if variants else ""
    )


def check_lora_targets(skeleton, config: LoraTrainConfig) -> None:
    """The target modules match layers LoRA can adapt (what wrap_with_lora refuses, it refuses here)."""
    from studykit.modeling import wrap_with_lora

    wrap_with_lora(
        skeleton, config.rank, config.alpha, config.dropout, config.target_modules, config.use_rslora, config.use_dora
    )


def lora_parameter_groups(model, config: LoraTrainConfig) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024) gives the B matrices `loraplus_lr_ratio` x the learning rate of the A matrices."""
    ratio = config.loraplus_lr_ratio
    return grouped(
        model, config.weight_decay, lambda name: config.lr * ratio if ratio and "lora_B" in name else config.lr
    )


# Model FLOPs per trained token: 2N forward, 2N backward to the activations, 2N for the weight gradients, which LoRA's
# frozen base skips (its adapters' are negligible). Attention's own matmuls (12 x layers x width x context per token,
# 8% more at GPT-2 Small's 512 tokens) are left out, so an MFU from this errs low.
METHODS: dict[str, Method] = {
    "full": Method(
        "full",
        TrainConfig,
        "training/train_full_ft.py",
        wrap_full,
        6,
        full_parameter_groups,
        describe_full,
        reference=True,
        command_description=(
            "Stage 2: full fine-tuning. Every weight trains; AdamW, mixed precision on CUDA, runs under "
            "`accelerate launch`."
        ),
    ),
    "lora": Method(
        "lora",
        LoraTrainConfig,
        "training/train_lora.py",
        wrap_lora,
        4,
        lora_parameter_groups,
        describe_lora,
        check_on_skeleton=check_lora_targets,
        command_description=(
            "Stage 3: LoRA. The base model is frozen; adapters on attention c_attn and attention c_proj train by "
            "default."
        ),
    ),
}


def method_of(config: TrainConfig) -> Method:
    return METHODS[config.method]
