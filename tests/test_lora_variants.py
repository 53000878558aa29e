"""The LoRA variants a study can list (target presets, rsLoRA, DoRA, LoRA+) change the model and the optimizer as
peft and the papers define them, checked on the wrapped model, not on the flag; and a variant run trains, saves and
loads back to the same numbers."""

import contextlib
import io
import math

import pytest
import torch

from studykit.config import LoraTrainConfig, parse_config
from studykit.data import load_processed
from studykit.methods import wrap_lora
from studykit.metrics import score_sequences
from studykit.modeling import (
    count_parameters,
    load_base_model,
    load_checkpoint_for_eval,
)
from studykit.trainer import prepare_run, train

BLOCKS, WIDTH = 2, 64
# (in, out) of each GPT-2 projection on a 64-wide model.
SHAPES = {
    "attn.c_attn": (WIDTH, 3 * WIDTH),
    "attn.c_proj": (WIDTH, WIDTH),
    "mlp.c_fc": (WIDTH, 4 * WIDTH),
    "mlp.c_proj": (4 * WIDTH, WIDTH),
}


def wrap(inputs, **settings):
    config = LoraTrainConfig(model=str(inputs["model"]), data_dir=str(inputs["data"]), **settings)
    model, description = wrap_lora(load_base_model(str(inputs["model"])), config)
    return config, model, description


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def expected_modules(suffixes):
    return sorted(f"transformer.h.{block}.{suffix}" for block in range(BLOCKS) for suffix in suffixes)


def test_cli_accepts_every_variant_flag():
    config = parse_config(
        LoraTrainConfig,
        "",
        ["--target-modules", "attention+mlp", "--use-rslora", "--use-dora", "--loraplus-lr-ratio", "16"],
    )
    assert (config.target_modules, config.use_rslora, config.use_dora, config.loraplus_lr_ratio) == (
        ["attention+mlp"],
        True,
        True,
        16.0,
    )


@pytest.mark.parametrize(
    "preset, suffixes",
    [
        ("attention", ["attn.c_attn", "attn.c_proj"]),
        ("attention+mlp", list(SHAPES)),
        ("all-linear", list(SHAPES)),
    ],
)
def test_target_presets_adapt_exactly_their_modules(small_vocab_inputs, preset, suffixes):
    rank = 4
    _, model, description = wrap(small_vocab_inputs, rank=rank, target_modules=[preset])
    assert sorted(lora_layers(model)) == expected_modules(suffixes) == sorted(description["adapted_modules"])
    trainable, _ = count_parameters(model)
    assert trainable == BLOCKS * sum(rank * (SHAPES[suffix][0] + SHAPES[suffix][1]) for suffix in suffixes)


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 16), (True, 8 / math.sqrt(16))])
def test_rslora_scales_by_alpha_over_sqrt_rank(small_vocab_inputs, use_rslora, expected):
    _, model, _ = wrap(small_vocab_inputs, rank=16, alpha=8, use_rslora=use_rslora)
    scalings = [layer.scaling["default"] for layer in lora_layers(model).values()]
    assert scalings and all(scaling == pytest.approx(expected) for scaling in scalings)


def test_dora_adds_a_magnitude_per_output_initialised_to_the_weight_norms(small_vocab_inputs):
    base = load_base_model(str(small_vocab_inputs["model"]))
    _, model, _ = wrap(small_vocab_inputs, rank=4, use_dora=True)
    layers = lora_layers(model)
    assert layers
    for name, layer in layers.items():
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad
        # GPT-2's Conv1D stores (in, out): the norm of each output's weights is the norm of a column.
        base_weight = base.get_submodule(name).weight
        torch.testing.assert_close(magnitude.detach(), torch.linalg.norm(base_weight, dim=0), rtol=1e-5, atol=1e-6)
    trainable, _ = count_parameters(model)
    assert trainable == BLOCKS * sum(4 * (i + o) + o for i, o in (SHAPES["attn.c_attn"], SHAPES["attn.c_proj"]))


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(small_vocab_inputs):
    config = LoraTrainConfig(
        model=str(small_vocab_inputs["model"]),
        data_dir=str(small_vocab_inputs["data"]),
        rank=4,
        lr=1e-3,
        loraplus_lr_ratio=16.0,
        batch_size=2,
        grad_accum=1,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run = prepare_run(config)
    names = {id(parameter): name for name, parameter in run.model.named_parameters()}
    learning_rates = {
        names[id(p)]: group["initial_lr"] for group in run.optimizer.param_groups for p in group["params"]
    }
    lora_b = [lr for name, lr in learning_rates.items() if "lora_B" in name]
    others = [lr for name, lr in learning_rates.items() if "lora_B" not in name]
    assert lora_b and others
    assert all(lr == pytest.approx(16e-3) for lr in lora_b) and all(lr == pytest.approx(1e-3) for lr in others)


def test_a_variant_run_trains_saves_and_loads_back_to_its_numbers(small_vocab_inputs, tmp_path):
    config = LoraTrainConfig(
        model=str(small_vocab_inputs["model"]),
        data_dir=str(small_vocab_inputs["data"]),
        output_dir=str(tmp_path / "variant"),
        rank=4,
        lr=1e-2,
        target_modules=["attention+mlp"],
        use_rslora=True,
        use_dora=True,
        loraplus_lr_ratio=4.0,
        max_steps=3,
        batch_size=4,
        grad_accum=1,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        record = train(config).to_dict()
    assert record["lora"]["use_dora"] and record["lora"]["use_rslora"] and len(record["adapted_modules"]) == 4 * BLOCKS
    model = load_checkpoint_for_eval(tmp_path / "variant", str(small_vocab_inputs["model"]))
    layer = next(iter(lora_layers(model).values()))
    assert (
        layer.scaling["default"] == pytest.approx(config.alpha / math.sqrt(config.rank))
        and "default" in layer.lora_magnitude_vector
    )
    data = load_processed(small_vocab_inputs["data"])
    scores = score_sequences(model, list(data.dev["input_ids"]), 8, torch.device("cpu"), 0)
    assert scores.mean_nll == pytest.approx(record["final_dev_loss"], rel=1e-5)
