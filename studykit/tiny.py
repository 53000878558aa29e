"""A tiny GPT-2 and its own small tokenizer, built offline, so the whole pipeline runs in minutes on a CPU.

The quick preset's base model is first pre-trained briefly on the English text the kit ships
(data/sample/general_text.txt), so that, as with GPT-2, LoRA adapts a model that already models language: on a
randomly initialised base, the comparison of LoRA with full fine-tuning would say nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from studykit.data import collate, pack_sequences
from studykit.errors import UserError
from studykit.io import atomic_directory
from studykit.loss import batch_nll
from studykit.metrics import perplexity, predicted_tokens_per_sequence, score_sequences
from studykit.oasst import read_local_file
from studykit.study_config import TinyModelConfig

NOTE_FILE = "TINY_MODEL.json"
# Paragraphs are separated by blank lines, as the study's extra_eval reads a text file.
BLANK_LINE = re.compile(r"\n[ \t]*\n")
# The learning rate rises linearly over this fraction of the steps, then decays along a cosine to MIN_LR_FRACTION of
# its peak, the schedule nanoGPT pre-trains with.
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.1
LR_SCHEDULE = f"linear warmup over {WARMUP_FRACTION:.0%} of the steps, then cosine decay to {MIN_LR_FRACTION:.0%} of lr"
# Gradients are clipped to this norm, as nanoGPT does, so that one unlucky batch cannot undo the warmup.
MAX_GRAD_NORM = 1.0
HELDOUT_BATCH_SIZE = 32


def sample_texts(data_file: Path) -> list[str]:
    _, messages, _ = read_local_file(Path(data_file), skip_bad_lines=True)
    return [m["text"] for m in messages if (m.get("text") or "").strip()]


def train_byte_level_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE like GPT-2's, trained on the sample, so no tokenizer download is needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=256,
    )


def tiny_gpt2(tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int, seed: int):
    """A randomly initialised GPT-2 for `tokenizer`'s vocabulary; the same seed gives the same weights."""
    from transformers import GPT2LMHeadModel

    if n_embd % n_head:
        raise UserError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}); choose sizes that divide.")
    torch.manual_seed(seed)
    config = tiny_gpt2_config(len(tokenizer), n_layer, n_embd, n_head, n_positions, tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)


# train_byte_level_tokenizer's only special token, <|endoftext|>, is the first it adds: id 0 in every tiny vocabulary.
TINY_EOS_TOKEN_ID = 0


def tiny_gpt2_config(
    vocab_size: int, n_layer: int, n_embd: int, n_head: int, n_positions: int, eos_token_id: int = TINY_EOS_TOKEN_ID
):
    """The tiny GPT-2's config with its own tokenizer's special tokens (GPT2Config's defaults, 50256, lie outside a
    small vocabulary: transformers calls that config invalid, and generation would never stop at the real EOS)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def build_tiny_gpt2(
    output_dir: Path,
    tokenizer,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
) -> Path:
    model = tiny_gpt2(tokenizer, n_layer, n_embd, n_head, n_positions, seed)
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        note = {"note": "randomly initialised tiny GPT-2 for offline runs and tests"}
        (staging / NOTE_FILE).write_text(json.dumps(note) + "\n")
    return output_dir


# ---------------------------------------------------------------------------------------------------------
# The quick preset's base model: the tiny GPT-2, pre-trained briefly on general English text
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyModelNote:
    """What TINY_MODEL.json records about a pre-trained tiny GPT-2: its inputs, its settings and what they achieved.
    Perplexities are per predicted token on the held-out text's paragraphs, each cut to `block_size` tokens."""

    note: str
    general_text: str  # the file's name
    general_text_sha256: str
    oasst_file: str  # the tokenizer is trained on its texts and the general text together
    oasst_file_sha256: str
    heldout_text: Optional[str]
    heldout_text_sha256: Optional[str]
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    seed: int
    pretrain_steps: int
    block_size: int  # tokens per training block
    batch_size: int  # blocks per step
    lr: float  # peak learning rate
    lr_schedule: str
    training_blocks: int  # blocks in one pass over the general text
    final_training_loss: Optional[float]  # the last step's mean NLL per predicted token
    heldout_perplexity_before: Optional[float]
    heldout_perplexity_after: Optional[float]
    pretrain_seconds: float  # the training steps alone
    build_seconds: float  # everything: tokenizer, training, scoring, saving


def read_paragraphs(text_file: Path) -> list[str]:
    """A plain text file's paragraphs, where blank lines separate them."""
    text_file = Path(text_file)
    try:
        text = text_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{text_file} does not exist; pass a plain text file, such as data/sample/general_text.txt."
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{text_file} is not UTF-8 text; pass a plain text file.") from None
    paragraphs = [block.strip() for block in BLANK_LINE.split(text) if block.strip()]
    if not paragraphs:
        raise UserError(f"{text_file} holds no text; pass a plain text file with paragraphs separated by blank lines.")
    return paragraphs


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def paragraph_ids(paragraphs: Sequence[str], tokenizer) -> list[list[int]]:
    """Each paragraph's token ids with EOS appended, so the model learns where a paragraph ends."""
    # verbose=False: paragraphs longer than the tokenizer's model_max_length are expected; they are cut later.
    encoded = tokenizer(list(paragraphs), add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids) + [tokenizer.eos_token_id] for ids in encoded]


def training_blocks(paragraphs: Sequence[str], tokenizer, block_size: int) -> list[list[int]]:
    """The text as one stream, EOS after each paragraph, cut into full blocks of `block_size` (the tail dropped)."""
    return pack_sequences(paragraph_ids(paragraphs, tokenizer), block_size)


def learning_rate(step: int, steps: int, peak_lr: float) -> float:
    """Linear warmup over the first WARMUP_FRACTION of the steps, then a cosine decay to MIN_LR_FRACTION of the peak."""
    warmup_steps = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak_lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def dropout_off(model) -> Iterator[None]:
    """Dropout at 0 inside, the model's own rates again after (they are saved with it, for fine-tuning).

    Pre-trained with GPT-2's dropout of 0.1, this small a model stays on the unigram plateau (loss ~5) for a
    seed-dependent while: after 400 steps seeds 0, 1, 2 reached held-out perplexity 48, 65 and 74; without
    dropout 48, 49 and 47.
    """
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    rates = [module.p for module in dropouts]
    for module in dropouts:
        module.p = 0.0
    try:
        yield
    finally:
        for module, rate in zip(dropouts, rates):
            module.p = rate


def shuffled_batches(blocks: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of block indices without end: a seeded shuffle of all blocks, then another, each pass used in full."""
    shuffle = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            next_pass = list(range(blocks))
            shuffle.shuffle(next_pass)
            order += next_pass
        yield order[:batch_size]
        order = order[batch_size:]


def pretrain(
    model, blocks: Sequence[Sequence[int]], steps: int, batch_size: int, peak_lr: float, seed: int, pad_token_id: int
) -> Optional[float]:
    """`steps` AdamW updates on batches of blocks, with dropout off (see dropout_off); returns the last step's mean
    NLL per predicted token (None for 0 steps)."""
    if steps == 0:
        return None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr)
    with dropout_off(model):
        for step, chosen in zip(range(steps), shuffled_batches(len(blocks), batch_size, seed)):
            batch = collate([blocks[i] for i in chosen], pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, peak_lr)
            tokens = predicted_tokens_per_sequence(batch["labels"]).sum()
            loss = batch_nll(model, batch, contextlib.nullcontext).total / tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # the only host sync of the loop


def heldout_perplexity(model, paragraphs: Sequence[str], tokenizer, block_size: int) -> float:
    """Each paragraph with EOS appended, cut to `block_size` tokens, scored as one sequence: how the study scores
    its extra_eval text (at its seq_len)."""
    sequences = [ids[:block_size] for ids in paragraph_ids(paragraphs, tokenizer)]
    scores = score_sequences(model, sequences, HELDOUT_BATCH_SIZE, torch.device("cpu"), tokenizer.eos_token_id)
    return perplexity(float(scores.nll_sums.sum()), int(scores.token_counts.sum()))


def check_pretraining_settings(
    pretrain_steps: int, block_size: int, batch_size: int, lr: float, n_positions: int
) -> None:
    if pretrain_steps < 0:
        raise UserError(f"pretrain_steps must be at least 0 (got {pretrain_steps}); 0 keeps the random model.")
    if not 2 <= block_size <= n_positions:
        raise UserError(f"block_size must be between 2 and the model's n_positions, {n_positions} (got {block_size}).")
    if batch_size < 1 or not lr > 0:
        raise UserError(f"batch_size must be at least 1 and lr above 0 (got {batch_size} and {lr}).")


# The defaults, measured on a shared 2-core CPU for n_layer 2, n_embd 64, vocab 512 (one thread): 400 steps of 8
# blocks of 128 tokens (about 10 passes over the text) take 15-25 s and bring held-out perplexity from ~520 to 47-49
# (seeds 0, 1, 2, 42). lr 1e-3, 2e-3 and 5e-3 reached 56, 48 and 76. 4 layers of 128 reached 48 in 70 s (training
# loss 3.2 against 3.6: the 41k tokens of text, not the model's size, are the limit).
def build_pretrained_tiny_gpt2(
    output_dir: Path,
    oasst_file: Path,
    general_text_file: Path,
    vocab_size: int,
    n_layer: int,
    n_embd: int,
    pretrain_steps: int,
    block_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    heldout_text_file: Optional[Path] = None,
    batch_size: int = 8,
    n_head: int = 2,
    n_positions: int = 256,
) -> TinyModelNote:
    """The quick preset's base model, saved to `output_dir` in one rename: a byte-level tokenizer trained on the
    OASST sample's texts and the general text, a tiny GPT-2 (seeded), then `pretrain_steps` steps on the general
    text alone (0: the random model). The held-out text, if given, is scored before and after and never trained on.
    Returns the note, also written beside the model as TINY_MODEL.json."""
    started = time.perf_counter()
    check_pretraining_settings(pretrain_steps, block_size, batch_size, lr, n_positions)
    general_paragraphs = read_paragraphs(general_text_file)
    heldout_paragraphs = read_paragraphs(heldout_text_file) if heldout_text_file is not None else []
    tokenizer = train_byte_level_tokenizer(sample_texts(Path(oasst_file)) + general_paragraphs, vocab_size)
    model = tiny_gpt2(tokenizer, n_layer, n_embd, n_head, n_positions, seed)
    blocks = training_blocks(general_paragraphs, tokenizer, block_size)
    if not blocks:
        raise UserError(
            f"{general_text_file} is shorter than one block of {block_size} tokens; "
            "pass a longer text or a smaller block_size."
        )

    def score_heldout() -> Optional[float]:
        return heldout_perplexity(model, heldout_paragraphs, tokenizer, block_size) if heldout_paragraphs else None

    heldout_before = score_heldout()
    training_started = time.perf_counter()
    final_loss = pretrain(model, blocks, pretrain_steps, batch_size, lr, seed, tokenizer.eos_token_id)
    pretrain_seconds = time.perf_counter() - training_started
    general_text_file = Path(general_text_file)
    heldout_name = Path(heldout_text_file).name if heldout_text_file is not None else None
    note = TinyModelNote(
        note=(
            f"tiny GPT-2 pre-trained for {pretrain_steps} steps on {general_text_file.name}"
            if pretrain_steps
            else "randomly initialised tiny GPT-2 (pretrain_steps 0)"
        ),
        general_text=general_text_file.name,
        general_text_sha256=file_sha256(general_text_file),
        oasst_file=Path(oasst_file).name,
        oasst_file_sha256=file_sha256(oasst_file),
        heldout_text=heldout_name,
        heldout_text_sha256=file_sha256(heldout_text_file) if heldout_name else None,
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        seed=seed,
        pretrain_steps=pretrain_steps,
        block_size=block_size,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=LR_SCHEDULE,
        training_blocks=len(blocks),
        final_training_loss=final_loss,
        heldout_perplexity_before=heldout_before,
        heldout_perplexity_after=score_heldout(),
        pretrain_seconds=round(pretrain_seconds, 2),
        build_seconds=0.0,
    )
    with atomic_directory(Path(output_dir)) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        note.build_seconds = round(time.perf_counter() - started, 2)
        (staging / NOTE_FILE).write_text(json.dumps(dataclasses.asdict(note), indent=2) + "\n")
    return note


def build_from_config(output_dir: Path, config: TinyModelConfig) -> TinyModelNote:
    """build_pretrained_tiny_gpt2 with a study's [tiny_model] settings (or the script's flags, the same fields)."""
    return build_pretrained_tiny_gpt2(
        Path(output_dir),
        Path(config.data_file),
        Path(config.general_text),
        config.vocab_size,
        config.n_layer,
        config.n_embd,
        config.pretrain_steps,
        block_size=config.pretrain_block_size,
        lr=config.pretrain_lr,
        seed=config.seed,
        heldout_text_file=Path(config.heldout_text) if config.heldout_text else None,
    )
