"""A tiny GPT-2 and its own small tokenizer, built offline, so the whole pipeline runs in minutes on a CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from studykit.io import atomic_directory
from studykit.oasst import read_local_file


def sample_texts(data_file: Path) -> list[str]:
    _, messages, _ = read_local_file(Path(data_file), skip_bad_lines=True)
    return [m["text"] for m in messages if (m.get("text") or "").strip()]


def train_byte_level_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE like GPT-2's, trained on the sample, so no tokenizer download is needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", model_max_length=256)


def build_tiny_gpt2(output_dir: Path, tokenizer, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 256, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "TINY_MODEL.json").write_text(json.dumps({"note": "randomly initialised tiny GPT-2 for offline runs and tests"}) + "\n")
    return output_dir
