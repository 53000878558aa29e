"""Each loss kernel gives the loss and the gradients of the usual full-logits cross-entropy, for every parameter; a
kernel this machine cannot run is refused in one sentence."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import refused, train_in_process
from torch.utils._python_dispatch import TorchDispatchMode

from studykit import loss
from studykit.data import collate
from studykit.errors import UserError
from studykit.loss import batch_nll, resolve_loss_kernel, token_nll_per_sequence, use_loss_kernel
from studykit.modeling import describe_kernels, load_base_model, wrap_with_lora

# The kernels this machine runs: torch's needs torch 2.13 or later, Liger's a CUDA GPU.
KERNELS = ["studykit"] + (["torch"] if loss.torch_has_fused_loss() else [])

# Uneven lengths, so the padded positions of the shorter rows must be left out of the output layer.
SEQUENCES = [[5, 17, 923, 44, 8, 50256], [70, 71, 50256], [3000, 12, 9, 88, 431, 2, 19, 50256], [7, 50256]]


@pytest.fixture
def three_positions_a_chunk(monkeypatch):
    """Chunks of 3 predicted positions: every response spans chunks, most chunks hold two responses."""
    monkeypatch.setitem(loss.LOGIT_CHUNK_BYTES, "cpu", 3 * 4 * 50257)
    assert loss.logit_chunk_positions(50257, "cpu") == 3


def build(model_dir, method, kernel="studykit"):
    model = load_base_model(str(model_dir))
    use_loss_kernel(model, kernel)
    torch.manual_seed(0)
    if method == "lora":
        model = wrap_with_lora(model, 4, 8.0, 0.0, ["attention"])
        with torch.no_grad():  # LoRA B starts at zero, which would hide a wrong gradient for A
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.05)
    return model.eval()  # no dropout: the two computations must see the same network


def loss_and_gradients(model, compute_loss):
    model.zero_grad(set_to_none=True)
    total, per_sequence = compute_loss(model)
    (total / 7.0).backward()  # an arbitrary scale, as the trainer's 1 / step_tokens
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(total.detach()), None if per_sequence is None else per_sequence.tolist(), gradients


def full_logits(model):
    batch = collate(SEQUENCES, 50256)
    per_sequence = token_nll_per_sequence(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    return per_sequence.sum(), per_sequence.detach()


def chunked(model):
    result = batch_nll(model, collate(SEQUENCES, 50256), contextlib.nullcontext)
    return result.total, result.per_sequence


def evaluation_rows(model, autocast=contextlib.nullcontext):
    """Per-response NLL sums as evaluation computes them: no gradients, every kernel gives them."""
    with torch.no_grad():
        return batch_nll(model, collate(SEQUENCES, 50256), autocast).per_sequence


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_has_the_full_logits_loss_and_gradients(method, kernel, tiny_model_dir, three_positions_a_chunk):
    expected_total, expected_rows, expected_gradients = loss_and_gradients(build(tiny_model_dir, method), full_logits)
    model = build(tiny_model_dir, method, kernel)
    total, rows, gradients = loss_and_gradients(model, chunked)
    assert total == pytest.approx(expected_total, rel=1e-6)
    if kernel == "studykit":  # torch's kernel gives the total alone when it makes gradients
        assert rows == pytest.approx(expected_rows, rel=1e-6)
    assert evaluation_rows(model).tolist() == pytest.approx(expected_rows, rel=1e-6)
    assert gradients.keys() == expected_gradients.keys()
    if method == "full":  # the output layer (tied to the embedding) gets its gradient from the chunks
        assert "transformer.wte.weight" in gradients
    else:
        assert len(gradients) == 2 * 2 * 2
    for name, gradient in gradients.items():
        scale = float(expected_gradients[name].abs().max())
        assert scale > 0, name
        # Float32 sums in another order: entries near zero differ by ~1e-7 of the largest one.
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_loss_under_bf16_autocast_stays_close_to_fp32(kernel, tiny_model_dir):
    model = build(tiny_model_dir, "full", kernel)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    exact, mixed = evaluation_rows(model), evaluation_rows(model, bf16)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, exact, rtol=2e-2, atol=0.0)
    training_total = batch_nll(model, collate(SEQUENCES, 50256), bf16).total
    assert float(training_total.detach()) == pytest.approx(float(exact.sum()), rel=2e-2)


def relative_errors(gradients, reference):
    return {name: float((gradients[name] - reference[name]).norm() / reference[name].norm()) for name in reference}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_under_fp16_loses_no_more_gradient_precision_than_the_usual_fp16_loss(
    method, kernel, tiny_model_dir, three_positions_a_chunk
):
    """fp16, the default on a GPU: each chunk's softmax gradient is made in fp32 and cast to fp16 before the
    matmuls, unscaled (the loss scale only reaches it in backward). Its gradients must be as close to fp32's as
    those of the usual fp16 step (full logits, autocast's fp32 cross-entropy, gradients scaled as GradScaler does)."""
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    # Each token's gradient enters backward scaled as at the defaults: GradScaler's 65,536 over ~6,000 tokens a step,
    # here 64 over loss_and_gradients' 7.
    loss_scale = 64.0

    def scaled(compute_loss, autocast):
        def compute(model):
            with autocast():
                total, per_sequence = compute_loss(model)
            return total * loss_scale, per_sequence

        return compute

    reference_total, _, reference = loss_and_gradients(build(tiny_model_dir, method), full_logits)
    _, _, usual = loss_and_gradients(build(tiny_model_dir, method), scaled(full_logits, fp16))
    total, _, ours = loss_and_gradients(build(tiny_model_dir, method, kernel), scaled(chunked, fp16))
    assert total / loss_scale == pytest.approx(reference_total, rel=1e-2)
    usual_errors = relative_errors({name: gradient / loss_scale for name, gradient in usual.items()}, reference)
    our_errors = relative_errors({name: gradient / loss_scale for name, gradient in ours.items()}, reference)
    assert max(usual_errors.values()) < 1e-2  # fp16 did run: the usual step itself is not exact
    assert min(usual_errors.values()) > 1e-5
    for name, error in our_errors.items():
        assert error <= 2 * usual_errors[name] + 1e-4, (name, error, usual_errors[name])
    assert sum(our_errors.values()) <= 1.25 * sum(usual_errors.values())


class LargestNewTensor(TorchDispatchMode):
    """The most elements any tensor made inside holds in its own memory (views of the weights do not count)."""

    def __init__(self, model):
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in self.weights:
                self.numel = max(self.numel, tensor.untyped_storage().nbytes() // tensor.element_size())
        return result


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_tensor_the_size_of_the_batch_logits_is_ever_made(
    method, kernel, tiny_model_dir, three_positions_a_chunk, monkeypatch
):
    """Every tensor the step makes, counted where it is made. torch's kernel is one custom op, whose temporaries the
    count cannot see: for it the check is that it is asked for chunks of 3 positions (its buffer is chunk x
    vocabulary)."""
    chunk_sizes = []
    if kernel == "torch":
        linear_cross_entropy = F.linear_cross_entropy

        def recording_chunks(*args, options, **kwargs):
            chunk_sizes.append(options.batch_chunk_size)
            return linear_cross_entropy(*args, options=options, **kwargs)

        monkeypatch.setattr(F, "linear_cross_entropy", recording_chunks)
    model = build(tiny_model_dir, method, kernel)
    batch = collate(SEQUENCES, 50256)
    with LargestNewTensor(model) as full_logits_step:
        full_logits(model)[0].backward()
    assert full_logits_step.numel >= batch["input_ids"].numel() * 50257  # the check sees the logits where they exist
    with LargestNewTensor(model) as chunked_step:
        chunked(model)[0].backward()
    # The largest is the last position's logits the model still returns (4 rows x 50,257; a chunk is 3 x 50,257),
    # or with full FT the output weights' 50,257 x 64 gradient.
    assert chunked_step.numel == max(len(SEQUENCES) * 50257, 50257 * 64 if method == "full" else 0)
    assert chunk_sizes == ([3] if kernel == "torch" else [])


@pytest.mark.parametrize("kernel", KERNELS)
def test_evaluation_computes_no_gradients(kernel, tiny_model_dir):
    model = build(tiny_model_dir, "full", kernel)
    with torch.no_grad():
        result = batch_nll(model, collate(SEQUENCES, 50256), contextlib.nullcontext)
    assert not result.total.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_the_chunked_backward_refuses_to_run_twice(tiny_model_dir):
    """Its gradients are scaled in place (no second copy of the output weights' gradient), so a second backward would
    be wrong; autograd refuses it instead."""
    model = build(tiny_model_dir, "full")
    total = batch_nll(model, collate(SEQUENCES, 50256), contextlib.nullcontext).total
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def test_auto_runs_the_kernel_the_measurements_chose_and_every_kernel_says_what_it_is(tiny_model_dir):
    assert resolve_loss_kernel("auto", "cpu") == resolve_loss_kernel("auto", "cuda") == loss.AUTO_LOSS_KERNEL
    model = build(tiny_model_dir, "full")
    assert describe_kernels(model)["loss"] == "output layer in chunks (studykit.loss)"
    use_loss_kernel(model, "torch")
    assert describe_kernels(model)["loss"] == "output layer in chunks (torch.nn.functional.linear_cross_entropy)"
    use_loss_kernel(torch.compile(model, backend="eager"), "liger")  # the choice reaches the model through its wrappers
    assert describe_kernels(model)["loss"] == "output layer in chunks (Liger's fused linear cross-entropy, Triton)"


def test_a_kernel_this_machine_cannot_run_is_one_sentence(monkeypatch):
    with pytest.raises(UserError, match=r"--loss-kernel liger needs a CUDA GPU .* use --loss-kernel auto\.$"):
        resolve_loss_kernel("liger", "cpu")
    # On a GPU without the package (the check itself needs no GPU).
    monkeypatch.setattr(loss.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs the liger_kernel and triton package, which is not installed; pip"):
        resolve_loss_kernel("liger", "cuda")
    monkeypatch.delattr(F, "linear_cross_entropy")  # torch before 2.13
    with pytest.raises(UserError, match=r"--loss-kernel torch needs torch.nn.functional.linear_cross_entropy"):
        resolve_loss_kernel("torch", "cpu")
    assert resolve_loss_kernel("studykit", "cpu") == "studykit"


def test_training_and_evaluation_refuse_liger_on_a_cpu_before_writing_anything(
    tmp_path, small_vocab_inputs, in_process
):
    model, data = small_vocab_inputs["model"], small_vocab_inputs["data"]
    line = refused(
        "training/train_full_ft.py",
        "--model",
        model,
        "--data-dir",
        data,
        "--output-dir",
        tmp_path / "run",
        "--loss-kernel",
        "liger",
        watch=[tmp_path],
        runner=in_process,
    )
    assert line.startswith("error: --loss-kernel liger needs a CUDA GPU")
    line = refused(
        "evaluation/perplexity.py",
        "--model",
        model,
        "--data-dir",
        data,
        "--checkpoints",
        tmp_path,
        "--output-dir",
        tmp_path / "results",
        "--loss-kernel",
        "liger",
        watch=[tmp_path],
        runner=in_process,
    )
    assert line.startswith("error: --loss-kernel liger needs a CUDA GPU")


@pytest.mark.skipif(not loss.torch_has_fused_loss(), reason="torch's linear_cross_entropy came in torch 2.13")
def test_a_run_with_torchs_kernel_trains_to_the_same_losses_and_records_it(tmp_path, small_vocab_inputs):
    budget = dict(max_steps=3, eval_every=3, precision="fp32")
    ours = train_in_process("full", small_vocab_inputs, tmp_path / "studykit", **budget)
    torchs = train_in_process("full", small_vocab_inputs, tmp_path / "torch", loss_kernel="torch", **budget)
    assert torchs["kernels"]["loss"] == "output layer in chunks (torch.nn.functional.linear_cross_entropy)"
    assert torchs["config"]["loss_kernel"] == "torch" and ours["config"]["loss_kernel"] == "auto"
    for key in ("final_train_loss", "final_dev_loss"):
        assert torchs[key] == pytest.approx(ours[key], rel=1e-5), key


def test_positions_found_on_the_host_give_the_loss_the_device_would_find(tiny_model_dir):
    """batching.collate_padded sends the scored positions with the batch (no wait for the device to count them);
    the loss and every gradient are those of the positions found from the labels."""
    from studykit.batching import collate_padded

    model = build(tiny_model_dir, "full")
    with_positions = collate_padded(SEQUENCES, 50256, 1, 64)
    without = {key: value for key, value in with_positions.items() if key != "predicted_positions"}
    # Row 1 (3 tokens) predicts from its positions 0 and 1 of a batch 8 wide: flat indices 8 and 9.
    assert with_positions["predicted_positions"].tolist()[5:7] == [8, 9]

    def loss_of(batch):
        def compute(model):
            result = batch_nll(model, batch, contextlib.nullcontext)
            return result.total, result.per_sequence

        return compute

    (total, rows, gradients), (expected_total, expected_rows, expected_gradients) = (
        loss_and_gradients(model, loss_of(batch)) for batch in (with_positions, without)
    )
    assert (total, rows) == (expected_total, expected_rows)
    assert all(torch.equal(gradients[name], expected_gradients[name]) for name in expected_gradients)
