"""One dataclass per stage; the command line is generated from it (studykit/settings.py) so a flag and a field never
disagree. The data and training stages' configs and defaults live here, each training field in a --help section
(HELP_SECTIONS); the configs of evaluation, the tiny model, the report and the study runner are in
studykit/study_config.py, outside the modules the training fingerprint hashes."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar, Optional

from studykit.errors import UserError
from studykit.learning_curves import EVAL_SCHEDULES
from studykit.settings import (
    CONFIG_FILE_DEST,
    LAUNCH_ACTIONS,
    MAX_SEED,
    build_parser,
    check_ranges,
    check_settings,
    command_line,
    config_to_dict,
    field_types,
    field_values,
    fields_accepted,
    option,
    parse_config,
    print_config,
    read_config_file,
    require,
    save_config,
)

# The engine's names, importable from here as before the engine had a module of its own.
__all__ = [
    "CONFIG_FILE_DEST",
    "LAUNCH_ACTIONS",
    "MAX_SEED",
    "build_parser",
    "check_ranges",
    "check_settings",
    "command_line",
    "config_to_dict",
    "field_types",
    "field_values",
    "fields_accepted",
    "option",
    "parse_config",
    "print_config",
    "read_config_file",
    "require",
    "save_config",
]


def check_pad_multiple(pad_to_multiple_of: Optional[int]) -> None:
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise UserError(
            f"--pad-to-multiple-of must be at least 1 (got {pad_to_multiple_of}); leave it out for the "
            "device's default."
        )


# [data] context: what a response is fed after. The processed data records it; training and evaluation follow it.
CONTEXTS = ("none", "parent")


def check_packing_context(packing: bool, context: str) -> None:
    """Packing joins responses into blocks without their prompts' boundaries, so it cannot keep prompt tokens out of
    the loss."""
    if packing and context != "none":
        raise UserError(
            f"--packing cannot train data prepared with --context {context} (a packed block has no place "
            "for each response's prompt); drop --packing or prepare the data with --context none."
        )


@dataclasses.dataclass
class PrepareConfig:
    dataset: str = option("OpenAssistant/oasst1", "hub dataset id (used when --data-file is not given)")
    data_file: Optional[str] = option(
        None, "local OASST export: flat messages (.jsonl, .jsonl.gz, .parquet) or message trees (.jsonl, .jsonl.gz)"
    )
    tokenizer: str = option("gpt2", "hub id or local directory of the tokenizer")
    output_dir: str = option("data/processed", "where the processed dataset is written")
    seq_len: int = option(512, "tokens per sequence at most (EOS included); longer responses are truncated", minimum=2)
    lang: str = option("en", "comma-separated language codes to keep, or 'all'")
    test_fraction: float = option(
        0.05, "share of a local file's conversation trees held out as the test split (the hub dataset brings its own)"
    )
    dev_fraction: float = option(
        0.05,
        "share of the training trees held out as the dev split, which training scores and "
        "every choice (learning rate, checkpoint) reads",
    )
    context: str = option(
        "none",
        "none: each assistant response alone; parent: each response after the prompter "
        "message it answers, whose tokens condition the response but are never targets nor "
        "counted in perplexity (a response whose parent is not a prompter message in the "
        "export is dropped)",
        choices=CONTEXTS,
    )
    skip_bad_lines: bool = option(False, "drop corrupt JSONL lines instead of stopping")
    overwrite: bool = option(
        False,
        "replace a dataset in --output-dir that was prepared from other inputs (one from the same "
        "inputs is kept as it is)",
    )

    def validate(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (got {self.seq_len}).")
        for flag, fraction in (("--test-fraction", self.test_fraction), ("--dev-fraction", self.dev_fraction)):
            if not 0 < fraction < 1:
                raise UserError(f"{flag} must lie between 0 and 1 (got {fraction}).")


PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DEVICES = ("auto", "cuda", "mps", "cpu")
# The optimizers a run can train with; studykit/optimizers.py builds each and knows its state's size.
OPTIMIZER_CHOICES = ("adamw", "adamw8bit", "paged-adamw8bit")
# --loss-kernel: studykit.loss's own chunks, torch's linear_cross_entropy, Liger's Triton kernel; auto picks (loss.py).
LOSS_KERNELS = ("auto", "studykit", "torch", "liger")
# --report-to: the experiment trackers accelerate drives (studykit/trackers.py), or none.
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# A Hub repo id: an optional namespace, then a name of letters, digits, '-', '_' and '.' (huggingface_hub's rule).
REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]{1,96}")


def check_repo_id(flag: str, repo_id: Optional[str], example: str) -> None:
    """A repo id the Hub would refuse is refused before any training, not after it."""
    if repo_id is not None and (not REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id):
        raise UserError(
            f"{flag} takes a Hub repo id such as {example} (letters, digits, '-', '_', '.'; got '{repo_id}')."
        )


@dataclasses.dataclass
class TrainConfig:
    """Full fine-tuning. The LoRA config below adds adapter settings, a larger learning rate and its own output
    directory."""

    model: str = option("gpt2", "hub id or local directory of the base model")
    tokenizer: Optional[str] = option(None, "tokenizer hub id or directory (default: the model's)")
    data_dir: str = option("data/processed", "processed dataset from data/prepare_oasst.py")
    output_dir: str = option("checkpoints/full_ft", "where the checkpoint, run.json and log.jsonl are written")
    seed: int = option(42, "seed for data order, dropout and initialisation", minimum=0, maximum=MAX_SEED)
    epochs: float = option(1.0, "passes over the training split (ignored when --max-steps is set)")
    train_fraction: float = option(
        1.0,
        "share of the training split's conversation trees to train on, chosen by a hash of the tree id so smaller "
        "shares are subsets of larger ones (0.25 of 0.5 of 1); dev and test stay whole",
    )
    max_steps: Optional[int] = option(None, "optimizer steps to run; overrides --epochs", minimum=1)
    batch_size: int = option(8, "sequences per micro-batch on each process", minimum=1)
    grad_accum: int = option(4, "micro-batches per optimizer step", minimum=1)
    lr: float = option(5e-5, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay (never applied to biases and LayerNorm)")
    adam_beta1: float = option(0.9, "AdamW's decay rate of the gradient's running mean")
    adam_beta2: float = option(
        0.95,
        "AdamW's decay rate of the squared gradient's running mean (0.95, as GPT-3 and "
        "nanoGPT, is steadier than 0.999 over short runs)",
    )
    adam_epsilon: float = option(1e-8, "AdamW's term added to the denominator for numerical stability")
    optimizer: str = option(
        "adamw",
        "adamw: torch's AdamW, 8 bytes of state per trainable parameter; "
        "adamw8bit: bitsandbytes' 8-bit AdamW, about 2 bytes; paged-adamw8bit: the same, "
        "in memory the CUDA driver moves to the CPU when the GPU is full (CUDA only)",
        choices=OPTIMIZER_CHOICES,
    )
    warmup_ratio: float = option(0.05, "share of steps with linear warmup")
    lr_schedule: str = option("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    precision: str = option(
        "auto", "auto: fp16 mixed precision on CUDA, fp32 on an Apple GPU (MPS) and a CPU", choices=PRECISIONS
    )
    device: str = option(
        "auto",
        "auto: the GPU torch sees (CUDA, else an Apple GPU), else the CPU (where a training estimated at over 30 "
        "minutes stops with its estimate unless --device cpu); cuda; mps; cpu",
        choices=DEVICES,
    )
    group_by_length: bool = option(True, "form micro-batches of similar length so little compute goes to padding")
    packing: bool = option(False, "concatenate responses into full blocks (changes what the model sees)")
    eval_every: int = option(200, "optimizer steps between validation passes (0: only at the end)", minimum=0)
    eval_schedule: str = option(
        "interval",
        "interval: the dev loss every --eval-every steps and at the end; log: also after steps 1, 2, 4, 8, ..., for a "
        "learning curve on a log axis (costs log2(steps) + 1 more passes over the dev split: 10 more for 600 steps)",
        choices=EVAL_SCHEDULES,
    )
    eval_batch_size: int = option(
        16, "longest validation responses per batch; shorter ones fill batches of as many tokens", minimum=1
    )
    log_every: int = option(10, "optimizer steps between log.jsonl lines", minimum=1)
    compile: bool = option(False, "torch.compile the model")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    loss_kernel: str = option(
        "auto",
        "how the output layer and loss are computed, never as full logits: studykit (its "
        "own chunks), torch (torch's linear_cross_entropy, torch 2.13+), liger (Liger's Triton "
        "kernel: CUDA, liger-kernel installed); auto: studykit",
        choices=LOSS_KERNELS,
    )
    pad_to_multiple_of: Optional[int] = option(
        None,
        "pad each batch's length up to a multiple of this, for tensor "
        "cores and few shapes under --compile; padding never counts (default: "
        "64 on CUDA, 1 on a CPU)",
        minimum=1,
    )
    max_gpu_memory_gb: Optional[float] = option(
        None, "cap this process's CUDA memory at this many GiB, e.g. 6 (default: no cap; CUDA only)"
    )
    auto_batch: bool = option(
        False,
        "use the largest micro-batch that fits (memory cap or GPU) and raise --grad-accum to keep the effective batch",
    )
    peak_tflops: Optional[float] = option(
        None, "one device's peak TFLOP/s, for the MFU figure (default: looked up by GPU name; none on a CPU)"
    )
    report_to: str = option(
        "none",
        "experiment tracker that gets every log.jsonl line and the config: tensorboard (event "
        "files in <output-dir>/tensorboard/), wandb or mlflow (their own logins); none",
        choices=TRACKERS,
    )
    push_to_hub: Optional[str] = option(
        None,
        "Hub repo id (ORG/NAME) the finished checkpoint directory is uploaded to, "
        "without its resumable checkpoints (default: no upload)",
    )
    save_every: int = option(0, "optimizer steps between resumable checkpoints (0: none but the final one)", minimum=0)
    keep: int = option(2, "resumable checkpoints to keep", minimum=1)
    resume: bool = option(False, "continue from the latest resumable checkpoint in --output-dir")
    overwrite: bool = option(False, "replace a finished run in --output-dir")
    trust_remote_code: bool = option(False, "allow model code from the hub to run")

    method = "full"
    # --help in sections, as the settings are read: what is trained on, what model and method, how the weights move,
    # how memory and speed are managed, what is logged, what is saved, what is uploaded.
    HELP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("data_dir", "tokenizer", "seed", "train_fraction", "group_by_length", "packing"),
        "model and method": ("model", "trust_remote_code"),
        "optimizer and schedule": (
            "epochs",
            "max_steps",
            "batch_size",
            "grad_accum",
            "lr",
            "optimizer",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "warmup_ratio",
            "lr_schedule",
            "max_grad_norm",
        ),
        "memory and speed": (
            "precision",
            "device",
            "compile",
            "gradient_checkpointing",
            "loss_kernel",
            "pad_to_multiple_of",
            "max_gpu_memory_gb",
            "auto_batch",
            "peak_tflops",
        ),
        "validation, logging and trackers": (
            "eval_every",
            "eval_schedule",
            "eval_batch_size",
            "log_every",
            "report_to",
        ),
        "checkpoints": ("output_dir", "save_every", "keep", "resume", "overwrite"),
        "Hub": ("push_to_hub",),
    }

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> None:
        positive = {
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--eval-batch-size": self.eval_batch_size,
            "--log-every": self.log_every,
            "--keep": self.keep,
        }
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value}).")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1 (got {self.max_steps}).")
        check_pad_multiple(self.pad_to_multiple_of)
        if self.max_steps is None:
            require("--epochs", self.epochs, "above 0", lambda value: value > 0)
        require("--lr", self.lr, "above 0", lambda value: value > 0)
        require("--train-fraction", self.train_fraction, "above 0 and at most 1", lambda value: 0 < value <= 1)
        require("--weight-decay", self.weight_decay, "0 or more", lambda value: value >= 0)
        require("--adam-beta1", self.adam_beta1, "from 0 to below 1", lambda value: 0 <= value < 1)
        require("--adam-beta2", self.adam_beta2, "from 0 to below 1", lambda value: 0 <= value < 1)
        require("--adam-epsilon", self.adam_epsilon, "above 0", lambda value: value > 0)
        require("--warmup-ratio", self.warmup_ratio, "from 0 to 1", lambda value: 0 <= value <= 1)
        # A negative norm would make torch scale the gradients by a negative factor: training would climb the loss.
        require("--max-grad-norm", self.max_grad_norm, "0 (no clipping) or more", lambda value: value >= 0)
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them.")
        if self.max_gpu_memory_gb is not None:
            require(
                "--max-gpu-memory-gb",
                self.max_gpu_memory_gb,
                "above 0; leave it out for no cap",
                lambda value: value > 0,
            )
        if self.peak_tflops is not None:
            require(
                "--peak-tflops",
                self.peak_tflops,
                "above 0; leave it out to look it up by GPU name",
                lambda value: value > 0,
            )
        check_repo_id("--push-to-hub", self.push_to_hub, "my-org/gpt2-oasst-lora")


# Training settings that never change which examples a step sees or how the weights move: where things are read
# and written, how often things are saved or logged, what may load, how memory is managed (the effective batch is
# kept), how MFU is reported, which tracker watches and where the result is uploaded. A study does not retrain a run
# when only these change.
OUTCOME_NEUTRAL = frozenset(
    {
        "resume",
        "overwrite",
        "output_dir",
        "data_dir",
        "save_every",
        "keep",
        "log_every",
        "eval_batch_size",
        "trust_remote_code",
        "auto_batch",
        "max_gpu_memory_gb",
        "peak_tflops",
        "report_to",
        "push_to_hub",
    }
)
# A resumed run may also change how its steps are computed and checked, never what they compute: the micro-batch
# split of the same effective batch, compilation, gradient checkpointing, the loss kernel, padding (all equal to
# float precision), and how often validation runs.
RESUME_MAY_CHANGE = OUTCOME_NEUTRAL | {
    "batch_size",
    "grad_accum",
    "compile",
    "gradient_checkpointing",
    "eval_every",
    "eval_schedule",
    "loss_kernel",
    "pad_to_multiple_of",
}


@dataclasses.dataclass
class LoraTrainConfig(TrainConfig):
    """LoRA: the base model is frozen and only low-rank adapters train, so a larger learning rate is needed."""

    output_dir: str = option("checkpoints/lora_r{rank}", "where the adapter, run.json and log.jsonl are written")
    lr: float = option(3e-4, "peak learning rate (LoRA's small, zero-initialised updates need a larger one)")
    rank: int = option(8, "LoRA rank r")
    alpha: Optional[float] = option(None, "LoRA alpha (default: 2 x rank)")
    dropout: float = option(0.05, "dropout on the LoRA input")
    target_modules: list[str] = option(
        ["attention"], "preset (attention, attention+mlp, all-linear) or module-name suffixes such as attn.c_attn"
    )
    use_rslora: bool = option(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    use_dora: bool = option(False, "weight-decomposed LoRA (DoRA)")
    loraplus_lr_ratio: Optional[float] = option(None, "LoRA+: learning rate of the B matrices = ratio x --lr")

    method = "lora"
    HELP_SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        **TrainConfig.HELP_SECTIONS,
        "model and method": (
            *TrainConfig.HELP_SECTIONS["model and method"],
            "rank",
            "alpha",
            "dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
            "loraplus_lr_ratio",
        ),
    }

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self.output_dir = self.output_dir.replace("{rank}", str(self.rank))

    def validate(self) -> None:
        super().validate()
        if not (self.rank > 0 and math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(
                f"LoRA needs a positive rank and alpha (got rank={self.rank}, alpha={self.alpha}); pass --rank and "
                "--alpha above 0."
            )
        require("--dropout", self.dropout, "from 0 to below 1", lambda value: 0 <= value < 1)
        if self.loraplus_lr_ratio is not None:
            require("--loraplus-lr-ratio", self.loraplus_lr_ratio, "above 0", lambda value: value > 0)
