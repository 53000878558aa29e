"""LoRA targets on the real GPT-2 Small architecture: attention c_attn and attention c_proj only."""

import re

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from studykit.modeling import (
    adapted_module_names,
    count_parameters,
    strip_peft_prefix,
    wrap_with_lora,
)

GPT2_SMALL_PARAMS = 124_439_808


@pytest.fixture(scope="module")
def gpt2_small_architecture():
    import torch

    with torch.device("meta"):
        return GPT2Config()


def lora_on_gpt2_small(config, rank):
    import torch

    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) == GPT2_SMALL_PARAMS
    return wrap_with_lora(model, rank, 2 * rank, 0.0, ["attention"])


@pytest.mark.parametrize("rank, expected", [(8, 442_368), (32, 1_769_472)])
def test_default_targets_and_trainable_counts(gpt2_small_architecture, rank, expected):
    model = lora_on_gpt2_small(gpt2_small_architecture, rank)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == GPT2_SMALL_PARAMS + expected
    # Independently: r * (in + out) for c_attn (768 -> 2304) and attention c_proj (768 -> 768), 12 blocks.
    assert expected == 12 * rank * ((768 + 2304) + (768 + 768))


def test_default_targets_never_touch_the_mlp(gpt2_small_architecture):
    names = [strip_peft_prefix(name) for name in adapted_module_names(lora_on_gpt2_small(gpt2_small_architecture, 8))]
    assert len(names) == 24
    assert all(re.fullmatch(r"transformer\.h\.\d+\.attn\.(c_attn|c_proj)", name) for name in names)
    assert not any(".mlp." in name for name in names)
