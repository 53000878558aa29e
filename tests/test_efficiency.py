"""No compute on padding, packing, gradient checkpointing, torch.compile, the memory estimate, cap and auto-batch.

Every comparison is against an independent computation: fixed-length padding, a batch-size-1 loop, the run
without the feature, or parameter counts worked out by hand.
"""

import contextlib
import json
import math

import pytest
import torch
from conftest import REPO_ROOT, build_tiny_model

from studykit.config import LoraTrainConfig, TrainConfig
from studykit.data import (
    IGNORE_INDEX,
    collate,
    load_processed,
    pack_sequences,
    plan_step_windows,
    split_window,
)
from studykit.errors import UserError
from studykit.loss import batch_nll, token_nll_per_sequence
from studykit.metrics import score_sequences
from studykit.modeling import (
    enable_activation_checkpointing,
    load_base_model,
    wrap_with_lora,
)

GIB = 1024**3


@pytest.fixture(scope="module")
def deterministic_model_dir(tmp_path_factory, gpt2_tokenizer):
    """Without dropout, runs that split the same step differently must agree to float precision."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-no-dropout"), gpt2_tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


@pytest.fixture(scope="module")
def train_sequences(processed_dir):
    return list(load_processed(processed_dir).train["input_ids"])


def bench_module(name: str):
    """A module of bench/ (scripts beside each other, not a package), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpadded_nll(model, sequences):
    """The reference: each sequence alone, no padding anywhere."""
    with torch.no_grad():
        return [
            float(token_nll_per_sequence(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids])))
            for ids in sequences
        ]


def test_dynamic_padding_gives_the_loss_of_fixed_length_padding(
    deterministic_model_dir, train_sequences, processed_dir
):
    model = load_base_model(str(deterministic_model_dir)).eval()
    seq_len = load_processed(processed_dir).meta["seq_len"]
    lengths = [len(ids) for ids in train_sequences]
    window = plan_step_windows(lengths, 8, seed=0, epoch=0, group_by_length=True)[0]
    step_tokens = sum(lengths[i] - 1 for i in window)

    def window_loss(micro_batches, pad_to):
        nll = 0.0
        with torch.no_grad():
            for indices in micro_batches:
                batch = collate([train_sequences[i] for i in indices], 0, pad_to=pad_to)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                nll += float(token_nll_per_sequence(logits, batch["labels"]).sum())
        return nll / step_tokens

    fixed = window_loss([window], pad_to=seq_len)
    for micro_batches in (1, 2, 4, 8):
        assert window_loss(split_window(window, lengths, micro_batches), pad_to=None) == pytest.approx(fixed, rel=1e-5)
    assert fixed == pytest.approx(
        sum(unpadded_nll(model, [train_sequences[i] for i in window])) / step_tokens, rel=1e-5
    )
    assert max(lengths[i] for i in window) < seq_len, (
        "the window should hold padding for the comparison to mean anything"
    )


def test_length_sorted_evaluation_gives_the_perplexity_of_fixed_length_padding(
    deterministic_model_dir, train_sequences, processed_dir
):
    model = load_base_model(str(deterministic_model_dir)).eval()
    seq_len = load_processed(processed_dir).meta["seq_len"]
    scores = score_sequences(model, train_sequences, 8, torch.device("cpu"), pad_token_id=0)
    batch = collate(train_sequences, 0, pad_to=seq_len)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fixed_nll = token_nll_per_sequence(logits, batch["labels"]).double()
    fixed_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert scores.tokens == fixed_tokens == sum(len(ids) - 1 for ids in train_sequences)
    assert torch.allclose(torch.from_numpy(scores.nll_sums), fixed_nll, rtol=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(float(fixed_nll.sum()) / fixed_tokens), rel=1e-6)


def test_evaluation_batches_of_short_responses_hold_as_many_tokens_as_the_first():
    from studykit.data import SHORT_BATCH_GROWTH, length_sorted_batches

    lengths = [512] * 20 + [300] * 7 + [100] * 200 + [40] * 50 + [3] * 500
    batches = length_sorted_batches(lengths, 16)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)
    padded = [len(batch) * max(lengths[i] for i in batch) for batch in batches]
    assert len(batches[0]) == 16 and padded[0] == 16 * 512
    assert max(padded) == padded[0]  # memory peaks at the first batch, as with fixed batches of 16
    assert max(len(batch) for batch in batches) == SHORT_BATCH_GROWTH * 16  # the 3-token responses hit the row cap
    assert [len(batch) for batch in batches if max(lengths[i] for i in batch) == 100][0] == 16 * 512 // 100
    assert len(batches) < len(lengths) / 16 / 3
    assert length_sorted_batches([], 16) == [] and length_sorted_batches([5, 4, 3], 2) == [[0, 1], [2]]


def test_padded_widths_round_up_to_the_multiple_within_the_data():
    from studykit.batching import padded_width, resolve_pad_multiple

    assert [padded_width(length, 64, 512) for length in (1, 63, 64, 65, 500, 512)] == [64, 64, 64, 128, 512, 512]
    assert padded_width(500, 64, 500) == 500  # never wider than the data's seq_len, which the model's context holds
    assert [padded_width(length, 1, 512) for length in (1, 65)] == [1, 65]
    resolved = [resolve_pad_multiple(given, device) for given, device in ((None, "cuda"), (None, "cpu"), (8, "cuda"))]
    assert resolved == [64, 1, 8]
    with pytest.raises(UserError, match="--pad-to-multiple-of must be at least 1 .got 0."):
        TrainConfig(pad_to_multiple_of=0).validate()


def test_padding_to_a_multiple_changes_no_training_loss(deterministic_model_dir, processed_dir, tmp_path):
    common = dict(model=str(deterministic_model_dir), data_dir=str(processed_dir), batch_size=4, grad_accum=2)
    default, unpadded = train_in_process(TrainConfig, tmp_path, "default", **common)
    assert default["config"]["pad_to_multiple_of"] == 1, "recorded as resolved: no padding on a CPU"
    assert json.loads((tmp_path / "default" / "train_config.json").read_text())["pad_to_multiple_of"] == 1
    for multiple in (16, 64):
        record, padded = train_in_process(
            TrainConfig, tmp_path, f"pad{multiple}", pad_to_multiple_of=multiple, **common
        )
        assert record["config"]["pad_to_multiple_of"] == multiple
        assert record["padded_tokens_seen"] > default["padded_tokens_seen"]
        assert record["tokens_seen"] == default["tokens_seen"]
        losses = [entry["train_loss"] for entry in padded]
        assert losses == pytest.approx([entry["train_loss"] for entry in unpadded], rel=1e-6)
        assert record["final_dev_loss"] == pytest.approx(default["final_dev_loss"], rel=1e-6)
    # The seq_len of this data is 64: every batch padded to 64 is the fixed-length layout.
    assert record["padded_tokens_seen"] == 3 * 8 * record["seq_len"]


def test_padding_evaluation_batches_changes_no_perplexity(deterministic_model_dir, train_sequences):
    model = load_base_model(str(deterministic_model_dir)).eval()
    exact = score_sequences(model, train_sequences, 8, torch.device("cpu"), pad_token_id=0)
    for multiple in (8, 64):
        padded = score_sequences(
            model, train_sequences, 8, torch.device("cpu"), pad_token_id=0, pad_to_multiple_of=multiple
        )
        assert padded.token_counts.tolist() == exact.token_counts.tolist()
        assert padded.nll_sums == pytest.approx(exact.nll_sums, rel=1e-6)


def test_batches_reach_a_gpu_from_pinned_memory_without_blocking_the_host(monkeypatch):
    """The CUDA branch, run on a CPU: pinning and the copy are recorded instead of done."""
    from studykit.batching import to_device

    batch, calls = collate([[1, 2, 3], [4]], 0), []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: calls.append("pin") or tensor)
    monkeypatch.setattr(torch.Tensor, "to", lambda tensor, *args, **kwargs: calls.append((args, kwargs)) or tensor)
    gpu = torch.device("cuda", 0)
    assert to_device(batch, gpu).keys() == batch.keys()
    assert calls == ["pin", ((gpu,), {"non_blocking": True})] * 3
    calls.clear()
    to_device(batch, torch.device("cpu"))
    assert calls == [((torch.device("cpu"),), {})] * 3  # a CPU run moves (copies) nothing


def test_a_steps_micro_batches_are_collated_before_its_first_forward_pass(small_vocab_inputs, tmp_path, monkeypatch):
    from conftest import train_in_process as train_method

    from studykit import batching, trainer

    collated, seen_at_forward = [], []
    collate_padded, batch_nll_of = batching.collate_padded, trainer.batch_nll
    monkeypatch.setattr(batching, "collate_padded", lambda *args: collated.append(1) or collate_padded(*args))
    monkeypatch.setattr(
        trainer, "batch_nll", lambda *args: seen_at_forward.append(len(collated)) or batch_nll_of(*args)
    )
    train_method("full", small_vocab_inputs, tmp_path / "run", max_steps=2, grad_accum=3, eval_every=0)
    assert seen_at_forward == [3, 3, 3, 6, 6, 6]


def test_packing_makes_full_blocks_of_the_response_stream(train_sequences):
    block = 16
    blocks = pack_sequences(train_sequences, block)
    stream = [token for ids in train_sequences for token in ids]
    assert all(len(ids) == block for ids in blocks)
    assert len(blocks) == len(stream) // block
    assert [token for ids in blocks for token in ids] == stream[: len(blocks) * block]


def train_in_process(config_cls, tmp_path, name, **overrides):
    from studykit.trainer import train

    config = config_cls(output_dir=str(tmp_path / name), max_steps=3, log_every=1, eval_every=0, **overrides)
    record = train(config).to_dict()
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return record, log


def test_packing_run_trains_on_full_blocks(deterministic_model_dir, processed_dir, tmp_path):
    record, _ = train_in_process(
        TrainConfig,
        tmp_path,
        "packed",
        model=str(deterministic_model_dir),
        data_dir=str(processed_dir),
        batch_size=2,
        grad_accum=2,
        packing=True,
    )
    assert record["packing"] is True
    # Packed blocks are all seq_len long, so no position in any batch is padding.
    assert record["tokens_seen"] == record["padded_tokens_seen"] == 3 * 4 * record["seq_len"]


def test_auto_batch_with_a_smaller_micro_batch_gives_the_same_losses(
    deterministic_model_dir, processed_dir, tmp_path, capsys
):
    common = dict(model=str(deterministic_model_dir), data_dir=str(processed_dir), batch_size=4, grad_accum=2)
    _, reference = train_in_process(TrainConfig, tmp_path, "asked", **common)
    # A cap far below the estimate makes the CPU path halve the micro-batch down to 1.
    record, auto = train_in_process(TrainConfig, tmp_path, "auto", auto_batch=True, max_gpu_memory_gb=1e-4, **common)
    assert "only applies to CUDA" in capsys.readouterr().out
    assert (record["memory"]["batch_size"], record["memory"]["grad_accum"]) == (1, 8)
    saved = json.loads(
        (tmp_path / "auto" / "train_config.json").read_text()
    )  # the config the run used, beside its output
    assert (
        (saved["batch_size"], saved["grad_accum"])
        == (1, 8)
        == (record["config"]["batch_size"], record["config"]["grad_accum"])
    )
    assert record["effective_batch"] == 8
    assert [entry["train_loss"] for entry in auto] == pytest.approx(
        [entry["train_loss"] for entry in reference], rel=1e-5
    )
    assert [entry["tokens_seen"] for entry in auto] == [entry["tokens_seen"] for entry in reference]


def test_auto_batch_on_a_gpu_halves_the_micro_batch_until_a_real_step_fits(
    tiny_model_dir, train_sequences, monkeypatch
):
    """The CUDA path of --auto-batch, run on a CPU: the step itself raises CUDA's out-of-memory error above three
    sequences, as the allocator under a cap would, after its forward and backward have made gradients."""
    from studykit import loss, memory_fit
    from studykit.runtime import build_accelerator

    accelerator = build_accelerator("fp32", seed=0)
    model = accelerator.prepare(load_base_model(str(tiny_model_dir)))
    model.train()  # dropout on: the probe must not move the run's random stream
    real_batch_nll, tried = loss.batch_nll, []

    def out_of_memory_above_three(model, batch, autocast):
        tried.append(batch["input_ids"].size(0))
        nll = real_batch_nll(model, batch, autocast)
        if batch["input_ids"].size(0) > 3:
            nll.total.backward()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return nll

    monkeypatch.setattr(loss, "batch_nll", out_of_memory_above_three)
    longest = max(train_sequences, key=len)
    rng_before = torch.get_rng_state()
    config = TrainConfig(batch_size=8, grad_accum=1)
    assert memory_fit.largest_fitting_by_probe(config, model, accelerator, longest, optimizer_bytes=1024) == 2
    assert tried == [8, 4, 2]
    assert all(
        parameter.grad is None for parameter in model.parameters()
    )  # neither failed nor fitting probes leave gradients
    assert torch.equal(torch.get_rng_state(), rng_before)
    # From 6 the next try is half, 3, which still divides the effective batch of 12 exactly.
    tried.clear()
    assert (
        memory_fit.largest_fitting_by_probe(TrainConfig(batch_size=6, grad_accum=2), model, accelerator, longest, 1024)
        == 3
    )
    assert tried == [6, 3]

    monkeypatch.setattr(
        loss, "batch_nll", lambda *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    )
    with pytest.raises(UserError, match="even a micro-batch of 1 sequences .*--gradient-checkpointing"):
        memory_fit.largest_fitting_by_probe(config, model, accelerator, longest, optimizer_bytes=1024)


def lora_model(model_dir):
    torch.manual_seed(0)  # the same adapter initialisation in both models
    model = wrap_with_lora(load_base_model(str(model_dir)), rank=4, alpha=8, dropout=0.1, targets=["attention"])
    # B starts at zero, which would leave A without a gradient; a trained adapter has both.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter.data, std=0.02)
    return model


def loss_and_lora_gradients(model, batch):
    model.train()
    torch.manual_seed(0)
    loss = batch_nll(model, batch, contextlib.nullcontext).total  # the trainer's loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}


def test_gradient_checkpointing_with_lora_matches_the_run_without(tiny_model_dir, train_sequences):
    # Dropout stays on (model and LoRA): checkpointing must replay the same masks when it recomputes.
    batch = collate(train_sequences[:4], 0)
    plain_loss, plain_gradients = loss_and_lora_gradients(lora_model(tiny_model_dir), batch)
    checkpointed = lora_model(tiny_model_dir)
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.get_base_model().is_gradient_checkpointing
    loss, gradients = loss_and_lora_gradients(checkpointed, batch)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert gradients.keys() == plain_gradients.keys() and len(gradients) == 2 * 2 * 2
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, plain_gradients[name], atol=1e-6, rtol=1e-4), name
    assert all(float(g.abs().sum()) > 0 for g in gradients.values()), "a LoRA matrix got no gradient"


def test_compile_flag_trains_to_the_same_losses(deterministic_model_dir, processed_dir, tmp_path, monkeypatch):
    # Inductor's code generation takes minutes on two CPU cores (checked by hand: 2 steps in 95 s, same losses),
    # so the test compiles with dynamo's eager backend: the graph capture and the trainer's handling of the
    # compiled module (accelerate, saving) are exercised, the C++ kernels are not.
    import functools

    common = dict(model=str(deterministic_model_dir), data_dir=str(processed_dir), batch_size=4, grad_accum=1)
    _, eager = train_in_process(TrainConfig, tmp_path, "eager", **common)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    record, compiled = train_in_process(TrainConfig, tmp_path, "compiled", compile=True, **common)
    assert record["config"]["compile"] is True
    assert [entry["train_loss"] for entry in compiled] == pytest.approx(
        [entry["train_loss"] for entry in eager], rel=1e-5
    )
    from safetensors.torch import load_file

    assert not any(key.startswith("_orig_mod") for key in load_file(tmp_path / "compiled" / "model.safetensors"))


def gpt2_small(lora: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
        return wrap_with_lora(model, rank=8, alpha=16, dropout=0.05, targets=["attention"]) if lora else model


@pytest.mark.parametrize("config_cls", [TrainConfig, LoraTrainConfig])
def test_gpt2_small_defaults_fit_six_gib_by_the_estimate(config_cls):
    from studykit.memory import estimate_for_model

    config = config_cls()
    model = gpt2_small(lora=config_cls is LoraTrainConfig)
    estimate = estimate_for_model(model, config.batch_size, 512, "fp16", config.gradient_checkpointing)
    assert estimate.total <= 6 * GIB, estimate.describe()
    # GPT-2 Small: 124,439,808 weights (lm_head tied to wte); LoRA r=8 on c_attn (768 -> 2304) and c_proj (768 -> 768)
    # of 12 blocks trains 12 * 8 * ((768 + 2304) + (768 + 768)) = 442,368.
    trainable = 442_368 if config_cls is LoraTrainConfig else 124_439_808
    assert estimate.gradients == 4 * trainable and estimate.optimizer_state == 8 * trainable
    assert estimate.weights == 4 * (124_439_808 + (442_368 if config_cls is LoraTrainConfig else 0))
    # The loss (studykit.loss) at fp16: a chunk of 200 MiB / (4 x 50,257) = 1,043 positions of fp32 + fp16 logits,
    # a fp16 copy of the 50,257 x 768 output weights, their fp32 gradient and its fp16 per-chunk part (full FT only:
    # the LoRA base is frozen), the fp32 gradient of the 8 x 512 final hidden states.
    output_weights = 50257 * 768
    weight_gradient = output_weights * (4 + 2) if config_cls is TrainConfig else 0
    assert estimate.chunked_loss
    assert estimate.loss == 1043 * 50257 * (4 + 2) + weight_gradient + output_weights * 2 + 8 * 512 * 768 * 4
    assert estimate.activations_other_setting < estimate.activations, "checkpointing must need less activation memory"


def saved_for_backward_bytes(model, batch) -> int:
    """What autograd actually keeps between forward and backward, counted by storage."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        batch_nll(model, batch, contextlib.nullcontext)
    return sum(storages.values())


def test_activation_estimate_is_close_to_what_autograd_keeps(tiny_model_dir):
    from studykit.memory import estimate_for_model

    model = load_base_model(str(tiny_model_dir)).train()
    batch = collate([[1] * 64] * 4, 0)
    estimate = estimate_for_model(model, 4, 64, "fp32", gradient_checkpointing=False)
    weights = sum(p.numel() * 4 for p in model.parameters())
    # Saved tensors include the weights themselves (matmul inputs). Of the loss, autograd keeps the gradients the
    # chunks worked out: the output weights' (50,257 x 64, fp32) and the final hidden states' (4 x 63 positions);
    # the chunk's logits, the rest of the estimate's loss item, are gone by then.
    measured = saved_for_backward_bytes(model, batch) - weights
    expected = estimate.activations + 50257 * 64 * 4 + 4 * 63 * 64 * 4
    assert measured == pytest.approx(expected, rel=0.25)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dropout", ["no dropout", "dropout"])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])  # those that run on a CPU
def test_estimate_bounds_the_measured_peak_of_two_training_steps(
    method, dropout, optimizer, deterministic_model_dir, tiny_model_dir
):
    """Every tensor of two steps (forward, chunked loss, backward, optimizer), counted while alive. With GPT-2's
    dropout (0.1), SDPA on a CPU falls back to keeping the attention matrices, which the estimate for a CPU counts."""
    from studykit.memory import estimate_for_model
    from studykit.optimizers import build_optimizer

    TensorMemoryPeak = bench_module("tensor_memory").TensorMemoryPeak

    model = load_base_model(str(tiny_model_dir if dropout == "dropout" else deterministic_model_dir)).train()
    if method == "lora":
        model = wrap_with_lora(model, rank=8, alpha=16, dropout=0.05, targets=["attention"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps = build_optimizer([{"params": trainable}], TrainConfig(optimizer=optimizer), torch.device("cpu"))
    batch = collate([list(range(1, 129))] * 8, 0)
    with TensorMemoryPeak(model.parameters()) as measured:
        for _ in range(2):
            batch_nll(model, batch, contextlib.nullcontext).total.backward()
            steps.step()
            steps.zero_grad(set_to_none=True)
    estimate = estimate_for_model(
        model, 8, 128, "fp32", gradient_checkpointing=False, device_type="cpu", optimizer=optimizer
    )
    # Measured: 0.89-0.95 of the estimate with AdamW, 0.86-0.95 with 8-bit AdamW (whose CPU update dequantises one
    # tensor's moments at a time, after the backward pass has freed the activations). Above it, a 6 GB run could
    # fail that the estimate passed.
    assert 0.75 * estimate.total <= measured.peak <= estimate.total, estimate.describe()


def test_out_of_memory_becomes_a_user_error_naming_the_flags():
    from studykit.memory_fit import out_of_memory_as_user_error

    with pytest.raises(UserError, match="--batch-size.*--grad-accum.*--gradient-checkpointing.*--auto-batch") as raised:
        with out_of_memory_as_user_error({"total": 7 * GIB, "micro_batch": 8}):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert "7.00 GiB" in str(raised.value)


def test_memory_cap_must_be_positive():
    with pytest.raises(UserError, match="--max-gpu-memory-gb"):
        TrainConfig(max_gpu_memory_gb=0).validate()


def test_precision_resolves_per_device(monkeypatch):
    from studykit.runtime import resolve_precision

    assert [resolve_precision("auto", device) for device in ("cuda", "cpu")] == ["fp16", "no"]
    assert [resolve_precision("fp32", device) for device in ("cuda", "cpu")] == ["no", "no"]
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match=r"--precision fp16 needs a CUDA or Apple \(MPS\) GPU"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a T4 or a GTX 1060
    with pytest.raises(UserError, match="does not support bf16; use --precision fp16"):
        resolve_precision("bf16", "cuda")


def test_memory_cap_on_a_gpu_limits_the_allocator_to_that_share_of_the_card(monkeypatch):
    from types import SimpleNamespace

    from studykit.memory_fit import apply_memory_cap

    fractions, said = [], []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * GIB))
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: fractions.append(fraction)
    )
    gpu = torch.device("cuda", 0)
    assert apply_memory_cap(6, gpu, said.append) == 6 * GIB
    assert fractions == [0.25] and said == ["GPU memory capped at 6 GiB (25.0% of 24.0 GiB)"]
    apply_memory_cap(48, gpu, said.append)  # a cap above the card's memory is the whole card
    assert fractions[-1] == 1.0
    assert apply_memory_cap(None, gpu, said.append) is None and len(fractions) == 2


@pytest.mark.parametrize("method", ["full", "lora"])
def test_model_flops_per_token_match_a_count_of_the_training_steps_matmuls(method, deterministic_model_dir):
    """6N per token for full fine-tuning, 4N for LoRA (no weight gradients for the frozen base), against torch's
    count of every matmul in a real step: forward, the chunked loss, backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from studykit.methods import METHODS
    from studykit.modeling import count_parameters

    model = load_base_model(str(deterministic_model_dir)) if method == "full" else lora_model(deterministic_model_dir)
    # 100-token responses: each one's last token is counted but predicts nothing, which short ones would overweight.
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 50257, (100 - k,), generator=generator).tolist() for k in range(8)]
    with FlopCounterMode(display=False) as counter:
        batch_nll(model, collate(sequences, 0), contextlib.nullcontext).total.backward()
    counted_per_token = counter.get_total_flops() / sum(len(ids) for ids in sequences)
    assert METHODS[method].flops_per_token(count_parameters(model)[1]) == pytest.approx(counted_per_token, rel=0.015)


def test_device_peak_for_mfu_is_looked_up_by_gpu_name(monkeypatch):
    from studykit.runtime import device_peak_tflops

    gpu, name = torch.device("cuda", 0), {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name["gpu"])
    expected = {
        "NVIDIA A100-SXM4-80GB": 312,
        "NVIDIA A10": 125,
        "NVIDIA A10G": 70,
        "NVIDIA L40S": 362,
        "NVIDIA L4": 121,
        "NVIDIA H100 80GB HBM3": 989,
        "NVIDIA H100 PCIe": 756,
        "Tesla T4": 65,
        "NVIDIA GeForce GTX 1660 SUPER": None,
    }
    for name["gpu"], tflops in expected.items():
        assert device_peak_tflops(gpu) == tflops, name["gpu"]
    assert device_peak_tflops(gpu, given=40) == 40  # --peak-tflops, for a GPU the table lacks
    assert device_peak_tflops(torch.device("cpu")) is None


def test_a_run_reports_mfu_against_the_given_peak(deterministic_model_dir, processed_dir, tmp_path, capsys):
    from studykit.report_markdown import format_throughput

    common = dict(model=str(deterministic_model_dir), data_dir=str(processed_dir), batch_size=2, grad_accum=2)
    unknown, _ = train_in_process(TrainConfig, tmp_path, "cpu", **common)
    assert unknown["mfu"] is None and unknown["peak_tflops_per_device"] is None
    assert "MFU not reported: no known peak for cpu (--peak-tflops sets one)" in capsys.readouterr().out
    record, _ = train_in_process(TrainConfig, tmp_path, "given", peak_tflops=0.5, **common)
    assert record["flops_per_token"] == 6 * record["total_params"] and record["peak_tflops_per_device"] == 0.5
    assert record["mfu"] == pytest.approx(record["tokens_per_second"] * record["flops_per_token"] / 0.5e12)
    # 3 steps: the first 2 warm up, the third is the steady figure.
    assert record["warmup_steps"] == 2 and unknown["steady_mfu"] is None
    steady_flops = record["steady_tokens_per_second"] * record["flops_per_token"]
    assert record["steady_mfu"] == pytest.approx(steady_flops / 0.5e12)
    assert "MFU against 0.5 TFLOP/s per device" in capsys.readouterr().out
    assert format_throughput(12345.6, 0.4123) == "12,346 (41.2% MFU)"
    assert format_throughput(12345.6, None) == "12,346"


def test_steady_speed_leaves_out_the_warm_up_of_a_run_and_of_its_resumption():
    from studykit.run_state import TrainingState, warmup_steps_for

    assert [warmup_steps_for(steps) for steps in (1, 6, 20, 30, 1000)] == [2, 2, 2, 3, 100]
    state = TrainingState()
    state.start_session(total_steps=30)
    for step in range(12):
        state.record_step(2.0, tokens=100, seconds=10.0 if step < 3 else 1.0)  # warm-up steps are slow
    assert (state.warmup_steps, state.steady_tokens, state.steady_seconds) == (3, 900, 9.0)
    assert state.steady_tokens_per_second == 100 and state.tokens_per_second == pytest.approx(1200 / 39)
    # Saved in a checkpoint and restored in a new process, which warms up again for two steps.
    resumed = TrainingState(**state.to_dict())
    resumed.start_session(total_steps=30)
    for step in range(12, 30):
        resumed.record_step(2.0, tokens=100, seconds=5.0 if step < 14 else 1.0)
    assert (resumed.warmup_steps, resumed.steady_tokens) == (5, 2500)
    assert resumed.steady_tokens_per_second == 100
    fresh = TrainingState()
    fresh.start_session(total_steps=2)
    fresh.record_step(2.0, tokens=100, seconds=1.0)
    fresh.record_step(2.0, tokens=100, seconds=1.0)
    assert fresh.steady_tokens_per_second is None and fresh.warmup_steps == 2  # every step warmed up


def test_a_resumed_run_keeps_its_steady_speed(small_vocab_inputs, tmp_path):
    """A finished run's last checkpoint resumed (its run.json set aside): the step it trains again warms up, so the
    steady figures are the ones the checkpoint saved."""
    from conftest import train_in_process as train_method

    from studykit.run_dir import CHECKPOINT_COMPLETE

    run = tmp_path / "run"
    first = train_method("full", small_vocab_inputs, run, max_steps=6, save_every=1, keep=1)
    assert first["warmup_steps"] == 2 and first["steady_tokens_per_second"] > 0
    saved = json.loads((run / "resume" / "step-000005" / CHECKPOINT_COMPLETE).read_text())
    assert saved["warmup_steps"] == 2 and saved["steady_tokens"] > 0
    (run / "run.json").unlink()
    resumed = train_method("full", small_vocab_inputs, run, max_steps=6, save_every=1, keep=1, resume=True)
    assert resumed["warmup_steps"] == 3  # steps 1-2, and step 6 after the restart
    assert resumed["steady_tokens_per_second"] == pytest.approx(saved["steady_tokens"] / saved["steady_seconds"])
    assert resumed["tokens_seen"] == first["tokens_seen"]


def test_log_gives_the_learning_rate_each_step_trained_with(
    deterministic_model_dir, processed_dir, tmp_path, monkeypatch
):
    """3 steps, 2 of them linear warmup to 1e-3 (0.7 x 3, rounded down), then cosine: by hand, 5e-4, 1e-3, 1e-3
    (cosine at 0).
    The log once gave the rate of the step after: 1e-3, 1e-3, 0."""
    from studykit import trainer

    used = []
    step = trainer.optimizer_step

    def record_the_rate(run, step_loss, state):
        used.append(run.optimizer.param_groups[0]["lr"])
        return step(run, step_loss, state)

    monkeypatch.setattr(trainer, "optimizer_step", record_the_rate)
    _, log = train_in_process(
        TrainConfig,
        tmp_path,
        "schedule",
        model=str(deterministic_model_dir),
        data_dir=str(processed_dir),
        batch_size=2,
        grad_accum=1,
        lr=1e-3,
        warmup_ratio=0.7,
    )
    assert used == pytest.approx([5e-4, 1e-3, 1e-3])
    assert [entry["lr"] for entry in log] == pytest.approx(used)


def test_a_model_skeleton_is_tied_like_a_built_model():
    """Estimates and plans build the model on the meta device; transformers 5.0 left that one's output layer untied
    (39M parameters too many for GPT-2 Small), so the skeleton ties it, as loading a checkpoint does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from studykit.modeling import model_skeleton

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128)
    skeleton = model_skeleton(config)
    assert skeleton.lm_head.weight is skeleton.transformer.wte.weight
    assert skeleton.lm_head.weight.device.type == "meta"
    built = sum(parameter.numel() for parameter in GPT2LMHeadModel(config).parameters())
    assert sum(parameter.numel() for parameter in skeleton.parameters()) == built
