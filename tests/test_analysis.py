"""The analysis stage: the gap by bucket adds up, the weight change is read in the right orientation, the spectra and
intruder numbers are right on matrices whose answer is known, the verdict's four answers, and the stage's cache."""

import json

import numpy as np
import pytest
import torch
from conftest import shortened_quick_study

from studykit.gap_buckets import (
    bucket_sums,
    bucket_tokens,
    decompose_gap,
    frequency_family,
    length_family,
    position_family,
    training_target_counts,
)
from studykit.verdict import answer
from studykit.weight_change import (
    BaseSpectra,
    adapted_weight_changes,
    block_linear_weights,
    effective_rank,
    energy_at_rank,
    intruder_indices,
    module_changes,
    out_in_weight,
    rank_holding,
    scaled_intruders,
    split_fused,
    subspace_similarity,
)


def random_targets(rng, responses, vocab):
    return [rng.integers(0, vocab, size=rng.integers(1, 90)) for _ in range(responses)]


def test_bucket_contributions_add_up_to_the_gap_in_every_family():
    rng = np.random.default_rng(0)
    targets = random_targets(rng, 60, 50)
    train = random_targets(rng, 200, 40)  # ids 40..49 never occur in training
    families = [
        frequency_family(targets, training_target_counts(train, 50)),
        position_family(targets),
        length_family(targets, [10, 30, 60]),
    ]
    assert "never seen in training" in families[0].labels
    seeds = 3
    token_nll = {
        model: [[rng.gamma(2.0, size=len(t)) for t in targets] for _ in range(seeds if model != "base" else 1)]
        for model in ("run", "reference", "base")
    }
    tree_ids = [f"tree{i // 2}" for i in range(len(targets))]
    all_tokens = sum(len(t) for t in targets)
    expected_gap = (
        np.mean(
            [
                sum(a.sum() - b.sum() for a, b in zip(run, reference))
                for run, reference in zip(token_nll["run"], token_nll["reference"])
            ]
        )
        / all_tokens
    )
    for family in families:
        run = np.stack([bucket_sums(values, family) for values in token_nll["run"]])
        reference = np.stack([bucket_sums(values, family) for values in token_nll["reference"]])
        base = bucket_sums(token_nll["base"][0], family)
        tokens = bucket_tokens(family)
        assert tokens.sum() == all_tokens
        total, rows = decompose_gap(run, reference, base, tokens, tree_ids, family.labels, 200, 0)
        assert abs(sum(row.gap_contribution for row in rows) - total) < 1e-9, family.name
        assert abs(total - expected_gap) < 1e-9
        assert sum(row.tokens for row in rows) == all_tokens
        assert all(row.interval is not None for row in rows if row.tokens)


def test_recovery_is_the_share_of_full_ft_gain():
    """A run that halves full FT's gain over the base in every token recovers exactly 0.5 in every bucket."""
    rng = np.random.default_rng(1)
    targets = random_targets(rng, 30, 20)
    family = position_family(targets)
    base = [rng.gamma(3.0, size=len(t)) + 2 for t in targets]
    reference = [values - 1.0 for values in base]
    run = [values - 0.5 for values in base]
    tokens = bucket_tokens(family)
    _, rows = decompose_gap(
        bucket_sums(run, family)[None],
        bucket_sums(reference, family)[None],
        bucket_sums(base, family),
        tokens,
        [str(i) for i in range(30)],
        family.labels,
        100,
        0,
    )
    for row in rows:
        if row.tokens:
            assert row.recovery == pytest.approx(0.5)
            assert row.gap_per_token == pytest.approx(0.5)


def matrix_with_spectrum(values, rows=40, columns=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64))
    spectrum = torch.zeros(min(rows, columns), dtype=torch.float64)
    spectrum[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return left[:, : len(spectrum)] @ torch.diag(spectrum) @ right[:, : len(spectrum)].T


def test_effective_rank_and_rank_90_on_known_spectra():
    flat = torch.linalg.svdvals(matrix_with_spectrum([2.0] * 5))
    assert effective_rank(flat) == pytest.approx(5.0, rel=1e-6)
    assert rank_holding(flat) == 5  # 90% of five equal parts needs all five
    steep = torch.linalg.svdvals(matrix_with_spectrum([3.0, 1.0]))
    assert rank_holding(steep) == 1  # 9 / (9 + 1) is exactly 90%
    assert energy_at_rank(steep, 1) == pytest.approx(0.9)
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(steep) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    assert effective_rank(torch.zeros(4)) == 0.0 and rank_holding(torch.zeros(4)) == 0


def test_subspace_similarity_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    basis, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert subspace_similarity(basis[:, :4], basis[:, :4], 4, 4) == pytest.approx(1.0)
    assert subspace_similarity(basis[:, :4], basis[:, 4:8], 4, 4) == pytest.approx(0.0, abs=1e-12)


def test_a_planted_intruder_is_found_and_a_small_dense_change_is_not():
    base = matrix_with_spectrum(np.linspace(5.0, 1.0, 28).tolist(), rows=64, columns=32).float()
    decomposition = torch.linalg.svd(base, full_matrices=True)
    base_left = decomposition.U[:, :32]
    # A direction orthogonal to every left singular vector of the base (its columns span 32 of 64 dimensions), fed by
    # an input direction the base ignores (its rank is 28), so it is a singular direction of its own.
    direction = torch.randn(64)
    direction -= base_left @ (base_left.T @ direction)
    direction /= direction.norm()
    planted = base + 8.0 * torch.outer(direction, decomposition.Vh[-1])
    planted_left = torch.linalg.svd(planted, full_matrices=False).U
    found = intruder_indices(base_left, planted_left, top_k=10, epsilon=0.5)
    assert found == [0]
    dense = base + 1e-3 * torch.randn(64, 32)
    assert intruder_indices(base_left, torch.linalg.svd(dense, full_matrices=False).U, 10, 0.5) == []
    # Scaling the intruder by 0 takes the planted direction out; by 1 leaves the weight as it was.
    removed = scaled_intruders(base, planted, 0.0, 10, 0.5)
    assert (removed.T @ direction).norm() < 0.05 * (planted.T @ direction).norm()
    assert torch.equal(scaled_intruders(base, planted, 1.0, 10, 0.5), planted)


def test_conv1d_and_fused_c_attn_read_as_the_linear_layer_of_the_same_numbers():
    from transformers.pytorch_utils import Conv1D

    width = 8
    torch.manual_seed(0)
    fused = Conv1D(3 * width, width)  # GPT-2's c_attn: weight (in, out) = (8, 24)
    linear = torch.nn.Linear(width, 3 * width)
    with torch.no_grad():
        linear.weight.copy_(fused.weight.T)
        linear.bias.copy_(fused.bias)
    x = torch.randn(5, width)
    assert torch.equal(out_in_weight(fused), linear.weight.detach())
    assert torch.allclose(fused(x), linear(x), atol=1e-6)
    blocks = split_fused("transformer.h.0.attn.c_attn", out_in_weight(fused))
    assert set(blocks) == {f"transformer.h.0.attn.c_attn{suffix}" for suffix in ("", ".q", ".k", ".v")}
    # GPT-2 splits c_attn's output into query, key and value along the last dimension.
    query, key, value = (fused(x) - fused.bias).split(width, dim=-1)
    for part, expected in zip("qkv", (query, key, value)):
        assert torch.allclose(x @ blocks[f"transformer.h.0.attn.c_attn.{part}"].T, expected, atol=1e-6)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def scaled_b_times_a(peft_model):
    """peft's LoRA product, scaling * B @ A, per adapted layer as (out, in), computed from the adapter's matrices."""
    from peft.tuners.lora import LoraLayer

    products = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            product = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            products[name.removeprefix("base_model.model.")] = product.detach()
    return products


def test_lora_dw_is_the_merged_weights_minus_the_base_and_equals_scaled_b_times_a():
    from peft import LoraConfig, get_peft_model

    base_weights = block_linear_weights(tiny_gpt2())
    # fan_in_fan_out: GPT-2's Conv1D stores (in, out), as the kit's own LoRA config says (modeling.py).
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False, fan_in_fan_out=True
    )
    model = get_peft_model(tiny_gpt2(), config)
    products = scaled_b_times_a(model)
    merged, deltas = adapted_weight_changes(model, base_weights)
    assert len(deltas) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    merged_weights = block_linear_weights(merged)
    for name, delta in deltas.items():
        assert torch.equal(delta, merged_weights[name] - base_weights[name]), name
        # B @ A is (out, in) whatever the layer's storage: the Conv1D transpose is undone.
        assert torch.allclose(delta, products[name], atol=1e-6), name
        assert torch.linalg.matrix_rank(delta) <= 4
    changes = module_changes(deltas, BaseSpectra(base_weights), top_k=10, epsilon=0.5, keep_directions=4)
    assert "transformer.h.0.attn.c_attn.v" in changes
    assert all(change.rank_90 <= 4 for change in changes.values())


def test_dora_dw_includes_its_magnitude():
    """DoRA's merged weight is not base + B @ A; the weight change is what the trained model computes with."""
    from peft import LoraConfig, get_peft_model

    base_weights = block_linear_weights(tiny_gpt2())
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, use_dora=True, fan_in_fan_out=True
    )
    model = get_peft_model(tiny_gpt2(), config).eval()
    # A trained magnitude: at initialisation DoRA's magnitude is the norm of W + B @ A, which merges to W + B @ A.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.5)
    products = scaled_b_times_a(model)
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    merged, deltas = adapted_weight_changes(model, base_weights)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-4)
    name = "transformer.h.0.attn.c_attn"
    assert not torch.allclose(deltas[name], products[name], atol=1e-4)


def test_intruders_match_peft_on_a_linear_layer():
    """On nn.Linear, whose storage is (out, in), the kit's test and peft's reduce_intruder_dimension agree."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 32)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=64, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    base = layer.get_base_layer().weight.detach().clone()
    delta = layer.get_delta_weight("default").detach()  # nn.Linear: stored (out, in) already
    ours = intruder_indices(
        torch.linalg.svd(base, full_matrices=False).U, torch.linalg.svd(base + delta, full_matrices=False).U, 10, 0.5
    )
    logged = []
    reduce_intruder_dimension(model, logging_sink=logged.append)
    peft_count = next(int(line.split(": ")[-1]) if "Intruders" in line else 0 for line in logged if "proj" in line)
    assert len(ours) == peft_count > 0


@pytest.mark.parametrize(
    "interval, expected",
    [
        ((0.99, 1.04), "equivalent"),
        ((0.90, 1.03), "non-inferior"),
        ((0.80, 0.90), "non-inferior"),
        ((1.06, 1.20), "worse"),
        ((1.02, 1.08), "inconclusive"),
        ((0.93, 1.10), "inconclusive"),
        (None, "inconclusive"),
    ],
)
def test_verdict_answers(interval, expected):
    assert answer(interval, 0.05) == expected


def two_run_study(path, lora_lr="1e-2"):
    """The quick preset cut to full FT and LoRA r8, one rate each, one seed."""
    text = shortened_quick_study(
        path,
        ("seeds = [0, 1]", "seeds = [0]"),
        ("lr = [3e-4, 1e-3]", "lr = 1e-3"),
        ("lr = [3e-3, 1e-2]", f"lr = {lora_lr}"),
        ("bootstrap_resamples = 1000", "bootstrap_resamples = 200"),
    ).read_text()
    path.write_text(text[: text.index('[[runs]]\nname = "lora_r32"')] + "[analysis]\nmitigation_lambdas = [0.0]\n")
    return path


def test_the_analysis_is_kept_while_current_and_a_changed_training_recomputes_only_its_parts(tmp_path):
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    output_dir = tmp_path / "study"
    first = run_study(StudyConfig(config=str(two_run_study(tmp_path / "a.toml")), output_dir=str(output_dir)))
    results = output_dir / "results"
    assert first["analyzed"]
    analysis = json.loads((results / "analysis.json").read_text())
    assert set(analysis["verdict"]) == {"lora_r8"}
    assert analysis["verdict"]["lora_r8"]["answer"] in ("equivalent", "non-inferior", "worse", "inconclusive")
    assert set(analysis["gap_by_bucket"]["lora_r8"]["families"]) == {
        "token_frequency",
        "position_in_response",
        "response_length",
    }
    assert analysis["weights"]["lora_r8"]["transformer.h.0.attn.c_attn.q"]["energy_at_rank"]
    assert analysis["mitigation"]["trainings"]["lora_r8__lr1e-2__seed0"][0]["lambda"] == 0.0
    assert "## Verdict" in (results / "results.md").read_text().split("**Protocol.**")[0]
    for figure in ("gap_by_bucket", "weight_change_spectra", "weight_change_map", "mitigation"):
        assert (results / f"{figure}.png").stat().st_size > 0

    # The token-level pass gives each response the evaluation's NLL: its buckets split the reported numbers.
    evaluated = np.load(results / "per_response_nll.npz")
    for name in ("base", "full_ft__lr1e-3__seed0", "lora_r8__lr1e-2__seed0"):
        part = np.load(results / "analysis_parts" / f"{name}.tokens.npz")
        assert np.allclose(part["response_nll"], evaluated[f"{name}/nll"], rtol=1e-6)
        assert np.allclose(part["token_frequency"].sum(axis=1), part["response_nll"], rtol=1e-9)

    parts = {path.name: path.stat().st_mtime_ns for path in (results / "analysis_parts").iterdir()}
    again = run_study(StudyConfig(config=str(two_run_study(tmp_path / "a.toml")), output_dir=str(output_dir)))
    assert not again["analyzed"]
    assert {path.name: path.stat().st_mtime_ns for path in (results / "analysis_parts").iterdir()} == parts

    run_study(StudyConfig(config=str(two_run_study(tmp_path / "b.toml", "3e-3")), output_dir=str(output_dir)))
    computed = json.loads((results / "analysis.json").read_text())["seconds"]["computed_parts"]
    assert sorted(computed) == [
        "lora_r8__lr3e-3__seed0.mitigation",
        "lora_r8__lr3e-3__seed0.tokens",
        "lora_r8__lr3e-3__seed0.weights",
    ]
    for name in ("base.tokens.npz", "full_ft__lr1e-3__seed0.tokens.npz", "full_ft__lr1e-3__seed0.weights.npz"):
        assert (results / "analysis_parts" / name).stat().st_mtime_ns == parts[name]
    # Alone on the study's directory (studykit-analyze DIR): everything is current, nothing is computed.
    from studykit.analysis import analyze_study_directory

    assert analyze_study_directory(str(output_dir)) is False


def test_analyze_refuses_a_directory_without_a_report(tmp_path):
    from studykit.analysis import analyze_study_directory
    from studykit.errors import UserError

    with pytest.raises(UserError, match="run the study first"):
        analyze_study_directory(str(tmp_path))


def test_a_dry_run_includes_the_analysis_in_its_plan_and_time(tmp_path, capsys):
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    run_study(StudyConfig(config=str(two_run_study(tmp_path / "a.toml")), output_dir=str(tmp_path / "s"), dry_run=True))
    out = capsys.readouterr().out
    assert "analyze " in out and "analysis: 3 token-scoring passes over the test split and 1 over" in out


def test_the_analysis_leaves_the_training_and_evaluation_code_versions_alone():
    """Nothing the analysis adds is code a training or an evaluation runs, so adding or editing it retrains nothing."""
    from studykit.runtime import OUTCOME_NEUTRAL_MODULES, studykit_imports_closure

    # What the analysis brings beside the study runner and the evaluation code it reuses (its general text is read as
    # evaluation reads it), less the presentation modules the report shares with it.
    analysis_modules = (
        studykit_imports_closure("studykit.analysis")
        - studykit_imports_closure("studykit.study_state")
        - studykit_imports_closure("studykit.evaluate")
        - OUTCOME_NEUTRAL_MODULES
    )
    assert {"studykit.verdict", "studykit.gap_buckets", "studykit.analysis_parts"} <= analysis_modules
    assert "studykit.weight_change" in analysis_modules and "studykit.analysis_config" not in analysis_modules
    for stage in ("studykit.trainer", "studykit.evaluate", "studykit.prepare"):
        closure = studykit_imports_closure(stage)
        assert not (closure & analysis_modules), stage
        assert "studykit.analysis_config" not in closure, stage
