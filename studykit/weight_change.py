"""Why LoRA falls short, matrix by matrix: the weight change dW = W_trained - W_base of every adapted module (every
linear layer of the blocks for full fine-tuning), its spectrum, and the intruder dimensions of W_trained.

Every matrix here is (out, in), as torch.nn.Linear stores it: GPT-2's Conv1D stores (in, out) and is transposed on
the way in, so that left singular vectors live in the output space for every layer. GPT-2's `c_attn` fuses the
query, key and value projections along its output: it is reported whole and as its three (d, d) blocks.

- effective rank (Roy & Vetterli 2007): exp of the entropy of the singular values normalised to sum to 1;
- rank_90 (Biderman et al. 2024): the fewest singular directions holding 90% of the energy (sum of squares);
- energy at rank r: the share of the energy the best rank-r approximation holds (Eckart-Young), i.e. the most a
  rank-r adapter could hold of full FT's change;
- subspace similarity (Hu et al. 2021, section 7): ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), 0 for orthogonal
  subspaces, 1 when one holds the other;
- intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): among the top_k singular vectors of W_trained,
  those whose largest |cosine| with any singular vector of W_base is below epsilon; the test peft ships in
  peft.tuners.lora.intruders.reduce_intruder_dimension, on the (out, in) matrix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

# Blocks of GPT-2-style models: transformer.h.<layer>.<kind>.
BLOCK_MODULE = re.compile(r"(?:^|\.)h\.(\d+)\.(.+)$")
FUSED_QKV = "attn.c_attn"
QKV_BLOCKS = ("q", "k", "v")
ENERGY_SHARE = 0.9


def out_in_weight(module) -> torch.Tensor:
    """A linear layer's weight as (out, in), float32; GPT-2's Conv1D stores it transposed."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.detach().float()
    return weight.T.contiguous() if isinstance(module, Conv1D) else weight


def block_linear_weights(model) -> dict[str, torch.Tensor]:
    """Every linear layer inside the transformer blocks (not the embeddings or the tied output layer), by its name
    without peft's prefix, as (out, in) float32."""
    from transformers.pytorch_utils import Conv1D

    weights = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, (torch.nn.Linear, Conv1D)) and BLOCK_MODULE.search(name):
            weights[name] = out_in_weight(module)
    return weights


def adapted_weight_changes(peft_model, base_weights: dict[str, torch.Tensor]):
    """Merge the adapters into their base (in place: the model becomes its merged base model) and return it with, per
    adapted block module, dW = W_merged - W_base as (out, in) float32 on the base weights' device. Merged weights are
    what the trained model computes with, so this is W_trained - W_base for every LoRA variant (DoRA's magnitude
    included), and for plain LoRA it is the scaled B @ A."""
    from peft.tuners.lora import LoraLayer

    adapted = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    merged = peft_model.merge_and_unload()
    weights = block_linear_weights(merged)
    deltas = {}
    for name in adapted:
        if name in weights and name in base_weights:
            base = base_weights[name]
            deltas[name] = weights[name].to(base.device) - base
    return merged, deltas


def split_fused(name: str, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """`c_attn` as itself and its query, key and value blocks (rows of the (out, in) matrix); others as themselves."""
    if not name.endswith(FUSED_QKV) or matrix.shape[0] != 3 * matrix.shape[1]:
        return {name: matrix}
    width = matrix.shape[1]
    return {
        name: matrix,
        **{f"{name}.{part}": matrix[i * width : (i + 1) * width] for i, part in enumerate(QKV_BLOCKS)},
    }


def module_position(name: str) -> tuple[Optional[int], str]:
    """(layer index, module kind such as attn.c_attn.q) of a block module's name; (None, name) elsewhere."""
    match = BLOCK_MODULE.search(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(-sum p log p) with p the singular values over their sum (Roy & Vetterli 2007); 0 for a zero matrix."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_at_rank(singular_values: torch.Tensor, rank: int) -> float:
    """Share of sum(s^2) held by the largest `rank` singular values: what the best rank-r approximation keeps."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    return float(energy[:rank].sum() / total) if total > 0 else 0.0


def rank_holding(singular_values: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The fewest singular directions whose energy reaches `share` of the total (0 for a zero matrix)."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # A tolerance, so a share met exactly is not missed by rounding.
    return int(torch.searchsorted(cumulative, torch.tensor(share, dtype=torch.float64) - 1e-12).item()) + 1


def subspace_similarity(left_a: torch.Tensor, left_b: torch.Tensor, i: int, j: int) -> float:
    """Hu et al. (2021) phi(a, b, i, j) = ||A_i^T B_j||_F^2 / min(i, j), over orthonormal columns."""
    overlap = left_a[:, :i].T.double() @ left_b[:, :j].double()
    return float((overlap**2).sum() / min(i, j))


def intruder_indices(
    base_left: torch.Tensor, trained_left: torch.Tensor, top_k: int = 10, epsilon: float = 0.5
) -> list[int]:
    """Indices among the top_k left singular vectors of W_trained whose largest |cosine| with every left singular
    vector of W_base is under epsilon (peft's reduce_intruder_dimension test)."""
    cosine = (trained_left.T @ base_left).abs().max(dim=1).values
    return torch.where(cosine[:top_k] < epsilon)[0].tolist()


@dataclass
class ModuleChange:
    """One module's numbers for one training."""

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor  # of dW, descending
    effective_rank: float
    rank_90: int
    intruders: list[int]
    # The leading left singular vectors of dW (out, kept), for subspace similarity.
    left: torch.Tensor = field(repr=False)

    def summary(self) -> dict:
        return {
            "shape": list(self.shape),
            "effective_rank": self.effective_rank,
            "rank_90": self.rank_90,
            "intruders": len(self.intruders),
            "intruder_indices": self.intruders,
            "norm": float(self.singular_values.double().norm()),
        }


class BaseSpectra:
    """The base model's left singular vectors per module, computed once and shared by every training."""

    def __init__(self, base_weights: dict[str, torch.Tensor]):
        self.weights = {}
        for name, weight in base_weights.items():
            self.weights.update(split_fused(name, weight))
        self._left: dict[str, torch.Tensor] = {}

    def left(self, name: str) -> torch.Tensor:
        if name not in self._left:
            self._left[name] = torch.linalg.svd(self.weights[name], full_matrices=False).U
        return self._left[name]


def module_changes(
    deltas: dict[str, torch.Tensor], base: BaseSpectra, top_k: int, epsilon: float, keep_directions: int
) -> dict[str, ModuleChange]:
    """Every module's change (c_attn also as q, k, v) from its dW, (out, in) float32. Modules outside the blocks (an
    adapter on the embeddings or the output layer) have no base spectrum here and are left out."""
    changes = {}
    for whole_name, whole_delta in deltas.items():
        if whole_name not in base.weights:
            continue
        for name, delta in split_fused(whole_name, whole_delta).items():
            left, singular_values, _ = torch.linalg.svd(delta, full_matrices=False)
            trained_left = torch.linalg.svd(base.weights[name] + delta, full_matrices=False).U
            changes[name] = ModuleChange(
                name=name,
                shape=(delta.shape[0], delta.shape[1]),
                singular_values=singular_values,
                effective_rank=effective_rank(singular_values),
                rank_90=rank_holding(singular_values),
                intruders=intruder_indices(base.left(name), trained_left, top_k, epsilon),
                left=left[:, :keep_directions].clone(),
            )
    return changes


def scaled_intruders(
    base_weight: torch.Tensor, trained_weight: torch.Tensor, scale: float, top_k: int, epsilon: float, base_left=None
) -> torch.Tensor:
    """W_trained with its intruder directions' singular values multiplied by `scale` (peft's mitigation_lambda: 1
    leaves the weight as trained, 0 removes the intruders), (out, in)."""
    left, singular_values, right = torch.linalg.svd(trained_weight, full_matrices=False)
    if base_left is None:
        base_left = torch.linalg.svd(base_weight, full_matrices=False).U
    found = intruder_indices(base_left, left, top_k, epsilon)
    if not found:
        return trained_weight
    intruders = (left[:, found] * singular_values[found]) @ right[found]
    return trained_weight + (scale - 1) * intruders
