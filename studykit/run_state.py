"""The state of one training run: what the loop carries from step to step, what a checkpoint saves, and run.json.

These types sit below checkpointing and the trainer, which both use them, so neither has to import the other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from studykit.config import TrainConfig, config_to_dict
from studykit.errors import UserError
from studykit.runtime import is_sharded

# run.json's layout. 1: the unversioned records of earlier releases; 2: this one (typed, with schema_version).
RUN_RECORD_SCHEMA = 2
# The first steps a process trains are left out of the steady-state speed: they compile (--compile), select kernels
# and grow the allocator's pools, and on a GPU the first ones took several times as long as the rest. A run warms
# up for its first max(2, 10% of its steps) steps, and a resumed one again for 2 steps after it restarts.
WARMUP_SHARE, MIN_WARMUP_STEPS = 0.1, 2


def warmup_steps_for(total_steps: int) -> int:
    """Steps a fresh run of `total_steps` leaves out of its steady-state figures."""
    return max(MIN_WARMUP_STEPS, math.ceil(WARMUP_SHARE * total_steps))


@dataclass
class TrainingState:
    """The position in the run, restored by a resumable checkpoint besides weights and optimizer."""

    step: int = 0
    tokens_seen: int = 0
    padded_tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    last_train_loss: Optional[float] = None
    last_dev_loss: Optional[float] = None
    # The steps after warm-up (see WARMUP_SHARE), summed over every process that trained the run.
    steady_tokens: int = 0
    steady_seconds: float = 0.0
    warmup_steps: int = 0  # steps left out of the steady figures

    # Not a field, so never saved: the step at which this process's warm-up ends (start_session sets it).
    session_warmup_ends = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def start_session(self, total_steps: int) -> None:
        """This process trains on from `step`: a fresh run warms up for warmup_steps_for(total_steps) steps, a resumed
        one until then and at least MIN_WARMUP_STEPS steps after its restart."""
        self.session_warmup_ends = max(warmup_steps_for(total_steps), self.step + MIN_WARMUP_STEPS)

    def record_step(self, loss: float, tokens: int, seconds: float) -> None:
        if self.step < self.session_warmup_ends:
            self.warmup_steps += 1
        else:
            self.steady_tokens += tokens
            self.steady_seconds += seconds
        self.step += 1
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self.last_train_loss = loss

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / max(self.train_seconds, 1e-9)

    @property
    def steady_tokens_per_second(self) -> Optional[float]:
        """Tokens per second after warm-up; None until a step after warm-up has been trained."""
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else None


@dataclass
class TrainingParts:
    """What a resumable checkpoint saves and restores: the model, its optimizer and schedule, and the accelerator
    that placed them on the devices (and knows whether they are sharded)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.accelerator)


@dataclass
class PreparedRun:
    """Everything a training run needs once its inputs have been checked and its model built."""

    config: TrainConfig
    parts: TrainingParts
    tokenizer: Any
    train_sequences: list
    dev_sequences: list
    data_meta: dict
    total_steps: int
    windows_per_epoch: int
    description: dict = field(default_factory=dict)
    # The step windows of the current epoch, planned once per epoch.
    windows_by_epoch: dict = field(default_factory=dict)
    # Each sequence's prompt tokens (--context parent), which are never targets; None: no sequence has a prompt.
    train_prompt_lengths: Optional[list] = None
    dev_prompt_lengths: Optional[list] = None

    @property
    def accelerator(self):
        return self.parts.accelerator

    @property
    def model(self):
        return self.parts.model

    @property
    def optimizer(self):
        return self.parts.optimizer

    @property
    def scheduler(self):
        return self.parts.scheduler

    @property
    def examples_per_step(self) -> int:
        return self.config.effective_batch * self.accelerator.num_processes

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint for the remaining steps to be those the first run would
        have taken: the settings, the data, the step count that shapes the schedule, the examples per step."""
        return {
            "config": config_to_dict(self.config),
            "data_fingerprint": self.data_meta["training_fingerprint"],
            "total_steps": self.total_steps,
            "examples_per_step": self.examples_per_step,
            # FSDP checkpoints key the optimizer state by parameter name, the others by position.
            "fsdp": self.parts.sharded,
        }


@dataclass
class RunRecord:
    """run.json: what a finished training run trained, on what, how long it took and what it cost, and what produced
    it, so that two runs can be checked for the same budget and a result traced to its code."""

    method: str
    config: dict[str, Any]  # the TrainConfig the run used, every default filled in (auto-batch's micro-batch included)
    base_model: str
    base_model_fingerprint: str
    trainable_params: int
    total_params: int  # LoRA: the frozen base plus the adapters, as peft counts them
    trainable_percent: float
    base_params: int
    adapted_modules: list[str]  # the exact module names LoRA adapted; empty for full fine-tuning
    kernels: dict[str, str]  # attention, MLP activation and loss implementations
    flops_per_token: int
    peak_tflops_per_device: Optional[float]
    memory: dict[str, Any]  # the estimate, the cap and the micro-batch --auto-batch chose
    data_dir: str
    training_data_fingerprint: str  # the train and dev splits it read (and their seq_len); never the test split
    dev_fingerprint: str
    tokenizer_fingerprint: Optional[str]
    seq_len: int
    packing: bool
    seed: int
    effective_batch: int  # sequences per optimizer step, over all processes
    num_processes: int
    parallelism: str
    steps: int
    tokens_seen: int  # real (non-padding) tokens trained on
    padded_tokens_seen: int
    wall_time_seconds: float
    tokens_per_second: float  # real tokens per second of training steps (dev-loss passes and saving excluded)
    mfu: Optional[float]
    peak_memory_bytes: int
    peak_memory_kind: str  # cuda_max_allocated, or process_max_rss on a CPU
    skipped_steps: int
    final_train_loss: Optional[float]
    final_dev_loss: Optional[float]
    device: str
    precision: str
    versions: dict[str, str]
    # The code version of what training runs (runtime.stage_code_version): a study adopts a training made by a printed
    # command when this, the method, the settings and the data match its own.
    train_code_version: str = ""
    lora: Optional[dict[str, Any]] = None  # rank, alpha, dropout, targets and variants of a LoRA run
    checkpoint_bytes: int = 0
    # adamw, adamw8bit or paged-adamw8bit (studykit/optimizers.py); records written before there was a choice trained
    # with adamw.
    optimizer: str = "adamw"
    # tokens_per_second and mfu over the steps after warm-up (None when every step was warm-up), and how many steps
    # warm-up left out (run_state.WARMUP_SHARE): what the run settles at, compilation and first allocations excluded.
    steady_tokens_per_second: Optional[float] = None
    steady_mfu: Optional[float] = None
    warmup_steps: int = 0
    schema_version: int = RUN_RECORD_SCHEMA

    def __post_init__(self) -> None:
        # Read from the config the run used, so that the two can never disagree.
        self.optimizer = self.config.get("optimizer", self.optimizer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> "RunRecord":
        version = values.get("schema_version", 1)
        if version != RUN_RECORD_SCHEMA:
            raise UserError(
                f"{where} is a run record of schema {version}, written by "
                f"{'an earlier' if version < RUN_RECORD_SCHEMA else 'a later'} version of the kit (this one reads "
                f"schema {RUN_RECORD_SCHEMA}); train that run again with this version."
            )
        known = {item.name for item in dataclasses.fields(cls)}
        missing = sorted(name for name in known if name not in values and _required(cls, name))
        if missing:
            raise UserError(
                f"{where} lacks {', '.join(missing[:4])}; it is not a complete run record: train that run again."
            )
        return cls(**{key: value for key, value in values.items() if key in known})

    @property
    def lr(self) -> float:
        return self.config["lr"]


def _required(cls, name: str) -> bool:
    item = next(item for item in dataclasses.fields(cls) if item.name == name)
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
