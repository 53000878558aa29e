"""The configs of the stages after training: evaluation ([eval] and `eval`), the tiny model a quick study builds
([tiny_model]), the report ([report]) and the study runner (run_study.py). None of them can change a trained weight, so
they live apart from the training configs in studykit/config.py, outside the training fingerprint's modules."""

from __future__ import annotations

import dataclasses
from typing import Optional

from studykit.config import DEVICES, LOSS_KERNELS, PRECISIONS, check_pad_multiple, check_repo_id
from studykit.errors import UserError
from studykit.settings import MAX_SEED, option, require


@dataclasses.dataclass
class EvalConfig:
    model: str = option("gpt2", "base model: scored as row 'base', and the base every adapter is applied to")
    tokenizer: Optional[str] = option(None, "tokenizer hub id or directory (default: the model's)")
    data_dir: str = option("data/processed", "processed dataset; its test split is scored")
    checkpoints: str = option("checkpoints", "directory whose run directories (full models or adapters) are scored")
    runs: list[str] = option(
        [], "names of the run directories under --checkpoints to score (default: every finished run)"
    )
    output_dir: str = option("results", "where perplexity.json and results.md are written")
    batch_size: int = option(16, "longest responses per batch; shorter ones fill batches of as many tokens", minimum=1)
    precision: str = option("auto", "auto: fp16 on CUDA, fp32 on an Apple GPU (MPS) and a CPU", choices=PRECISIONS)
    loss_kernel: str = option(
        "auto",
        "how the output layer and the NLL are computed: studykit, torch or liger, as in training (auto: studykit)",
        choices=LOSS_KERNELS,
    )
    pad_to_multiple_of: Optional[int] = option(
        None,
        "pad each batch's length up to a multiple of this; no perplexity changes (default: 64 on CUDA, 1 on a CPU)",
        minimum=1,
    )
    include_base: bool = option(True, "also score the base model")
    extra_eval: Optional[str] = option(
        None,
        "general text scored beside OASST, to show what a method forgets: a local text file "
        "(paragraphs split at blank lines, else lines) or a hub dataset NAME:CONFIG[:SPLIT] "
        "such as wikitext:wikitext-2-raw-v1 (test split by default)",
    )
    trust_remote_code: bool = option(False, "allow model code from the hub to run")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size}).")
        check_pad_multiple(self.pad_to_multiple_of)


@dataclasses.dataclass
class TinyModelConfig:
    """A study's [tiny_model]: a small GPT-2 and its own tokenizer, built offline and first trained briefly on general
    English text, so that, as with GPT-2, fine-tuning adapts a model that already models language."""

    data_file: str = option(
        "data/sample/oasst_sample.jsonl", "OASST texts the byte-level tokenizer is trained on, beside the general text"
    )
    general_text: str = option(
        "data/sample/general_text.txt",
        "plain English text the model is pre-trained on (paragraphs separated by blank lines)",
    )
    heldout_text: Optional[str] = option(
        "data/sample/general_text_heldout.txt",
        "general text never trained on, scored before and after pre-training (none: not scored)",
    )
    vocab_size: int = option(512, "tokenizer vocabulary size", minimum=1)
    n_layer: int = option(2, "transformer blocks", minimum=1)
    n_embd: int = option(64, "hidden size", minimum=1)
    pretrain_steps: int = option(
        400, "optimizer steps of pre-training on the general text (0: a random model)", minimum=0
    )
    pretrain_block_size: int = option(128, "tokens per pre-training sequence", minimum=2)
    pretrain_lr: float = option(3e-3, "peak learning rate of the pre-training")
    seed: int = option(0, "seed of the initial weights and of the pre-training's order", minimum=0, maximum=MAX_SEED)

    def validate(self) -> None:
        for flag, value in (("vocab_size", self.vocab_size), ("n_layer", self.n_layer), ("n_embd", self.n_embd)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1 (got {value}).")
        if self.pretrain_steps < 0:
            raise UserError(f"pretrain_steps must be 0 or more (got {self.pretrain_steps}).")


@dataclasses.dataclass
class ReportConfig:
    """A study's [report]: the bootstrap and the samples."""

    bootstrap_resamples: int = option(2000, "bootstrap resamples per interval", minimum=1)
    bootstrap_seed: int = option(
        0,
        "seed of the bootstrap resamples (the same for every run, so their intervals are paired)",
        minimum=0,
        maximum=MAX_SEED,
    )
    sample_prompts: int = option(4, "held-out prompts continued by every model in samples.md", minimum=0)
    sample_new_tokens: int = option(40, "tokens generated per sample at most", minimum=1)

    def validate(self) -> None:
        if self.bootstrap_resamples < 1 or self.sample_prompts < 0 or self.sample_new_tokens < 1:
            raise UserError("bootstrap_resamples and sample_new_tokens must be at least 1, sample_prompts at least 0.")


@dataclasses.dataclass
class StudyConfig:
    """The study runner: which study file to run, and where its results go. The study itself (data, budget, runs)
    lives in the TOML file, so one file is the record of what was compared."""

    preset: str = option(
        "default",
        "a study in studies/: default (GPT-2 Small, OASST1 from the hub) or quick (tiny model, shipped sample, CPU)",
    )
    config: Optional[str] = option(None, "a study TOML file of your own (overrides --preset)")
    output_dir: Optional[str] = option(
        None, "directory for the study's data, checkpoints and results (default: the study file's output_dir)"
    )
    readme: Optional[str] = option(
        None, "README whose results block is rewritten (default: the study file's readme; the quick preset names none)"
    )
    dry_run: bool = option(
        False, "print what would be prepared, trained, evaluated and reported, with an estimated time, and do nothing"
    )
    seeds: Optional[list[int]] = option(
        None,
        "seeds every run is trained with, replacing the study file's [budget] seeds, e.g. --seeds 0 1 2",
        minimum=0,
        maximum=MAX_SEED,
    )
    overrides: list[str] = option(
        [],
        "change one setting of the study file, TABLE.KEY=VALUE or runs.NAME.KEY=VALUE for the "
        "[[runs]] entry of that name (repeatable; the last wins), e.g. --set budget.lr=1e-4 --set "
        'runs.lora_r8.rank=16; VALUE is a TOML value (1e-4, [1e-4, 3e-4], "text", true), anything '
        "else a string; checked like the file and recorded in results.json",
        flag="--set",
        repeatable=True,
    )
    gpus: Optional[str] = option(
        None,
        "train side by side, one training per GPU: CUDA device ids such as 0,1, or 'all' for every "
        "visible GPU (default: one training at a time)",
    )
    launcher: str = option(
        "local",
        "local: each training in a process of its own; accelerate: each under `accelerate launch` "
        "with --num-processes processes; submitit: each a job of --cluster (one array per sweep phase)",
        choices=("local", "accelerate", "submitit"),
    )
    # --launcher submitit's settings; None: the study file's [launcher] table, else submitit's default (see
    # study_submitit.py). The [launcher] table takes the same keys.
    cluster: Optional[str] = option(
        None,
        "where --launcher submitit runs the jobs: slurm (sbatch), local (processes on this machine) or debug "
        "(one after the other in this process) (default: [launcher] cluster, else slurm)",
        choices=("slurm", "local", "debug"),
    )
    partition: Optional[str] = option(None, "SLURM partition of every job (default: the cluster's)")
    gpus_per_task: Optional[int] = option(
        None, "GPUs per training job (over 1: the training runs under accelerate launch on all of them) (default: 1)"
    )
    cpus_per_task: Optional[int] = option(None, "CPU cores per training job (default: the cluster's)")
    mem_gb: Optional[float] = option(None, "memory per training job in GB (default: the cluster's)")
    time_limit_min: Optional[int] = option(
        None,
        "wall-clock limit per job in minutes; a job that reaches it is requeued and resumes from its last "
        "checkpoint (default: 240)",
    )
    account: Optional[str] = option(None, "SLURM account the jobs are charged to")
    qos: Optional[str] = option(None, "SLURM quality of service")
    array_parallelism: Optional[int] = option(
        None, "most jobs of one array running at once (default: every job of the phase)"
    )
    sbatch_lines: list[str] = option(
        [],
        "an extra sbatch option as KEY=VALUE or --KEY=VALUE (a bare KEY for a switch), e.g. "
        "--sbatch-line constraint=a100 (repeatable)",
        flag="--sbatch-line",
        repeatable=True,
    )
    num_processes: int = option(
        1, "processes per training under --launcher accelerate (its GPUs: all visible, or --gpus)", minimum=1
    )
    print_commands: bool = option(
        False,
        "print every pending training as one command line (for a cluster scheduler, e.g. a "
        "SLURM array) and train nothing; a later run gathers what finished",
    )
    device: str = option(
        "auto",
        "every training's --device: auto stops a study whose pending trainings would take over 30 minutes "
        "on a CPU (with its estimated time) unless --device cpu",
        choices=DEVICES,
    )
    assume_tflops: float = option(
        25.0,
        "sustained model TFLOP/s the --dry-run time estimate assumes (about a third of a "
        "24 GB RTX 3090/4090's fp16 peak); runs this study already finished give a measured one too",
    )
    push_to_hub: Optional[str] = option(
        None,
        "after the report, upload each chosen training to the Hub as ORG/PREFIX-<training> "
        "and the results directory as the dataset ORG/PREFIX-results (default: no upload)",
    )

    def validate(self) -> None:
        if self.num_processes < 1:
            raise UserError(f"--num-processes must be at least 1 (got {self.num_processes}).")
        require("--assume-tflops", self.assume_tflops, "above 0", lambda value: value > 0)
        if self.num_processes > 1 and self.launcher != "accelerate":
            raise UserError("--num-processes needs --launcher accelerate (a local training is one process).")
        if self.launcher == "submitit" and self.gpus is not None:
            raise UserError(
                "--gpus places trainings on this machine's GPUs; with --launcher submitit use --gpus-per-task."
            )
        for flag, value in (
            ("--cpus-per-task", self.cpus_per_task),
            ("--mem-gb", self.mem_gb),
            ("--time-limit-min", self.time_limit_min),
            ("--array-parallelism", self.array_parallelism),
        ):
            if value is not None:
                require(flag, value, "above 0", lambda given: given > 0)
        if self.gpus_per_task is not None:
            require("--gpus-per-task", self.gpus_per_task, "0 or more", lambda given: given >= 0)
        check_repo_id("--push-to-hub", self.push_to_hub, "my-org/oasst-study")
