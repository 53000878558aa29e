"""The analysis's numbers, from its parts and the evaluation's per-response scores: the verdict per LoRA run, the
gap by bucket, the weight change per module, the mitigation curve and the worst responses. Pure computing: reading
and writing files is studykit.analysis's job.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Sequence

import numpy as np

from studykit.gap_buckets import BucketFamily, BucketGap, bucket_tokens, decompose_gap, largest_bucket
from studykit.statistics import PAIRED_SEEDS_AND_TREES_COVER, TREES_ONLY_COVER
from studykit.verdict import Verdict, answer, seed_paired_ratio
from studykit.weight_change import energy_at_rank, module_position, subspace_similarity


def verdicts(
    per_response: dict[str, np.ndarray],
    runs: dict[str, list[str]],
    reference: str,
    margin: float,
    resamples: int,
    seed: int,
) -> dict[str, Verdict]:
    """Each non-reference run's answer, from the evaluation's per-response NLL (the report's numbers)."""
    tokens, tree_ids = per_response["base/tokens"], per_response["message_tree_id"]
    reference_nll = np.stack([per_response[f"{name}/nll"] for name in runs[reference]])
    result = {}
    for run, names in runs.items():
        if run == reference:
            continue
        nll = np.stack([per_response[f"{name}/nll"] for name in names])
        ratio, interval = seed_paired_ratio(nll, reference_nll, tokens, tree_ids, resamples, seed)
        covers = PAIRED_SEEDS_AND_TREES_COVER if len(names) > 1 else TREES_ONLY_COVER
        result[run] = Verdict(run, reference, ratio, interval, margin, answer(interval, margin), covers)
    return result


def gap_by_bucket(
    token_parts: dict[str, dict[str, np.ndarray]],
    families: Sequence[BucketFamily],
    runs: dict[str, list[str]],
    reference: str,
    tree_ids: Sequence,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per non-reference run: the total gap in nats per token and, per family, each bucket's part of it."""
    result: dict[str, dict[str, Any]] = {}
    for run, names in runs.items():
        if run == reference:
            continue
        families_out = {}
        total = None
        for family in families:
            tokens = bucket_tokens(family)
            run_sums = np.stack([token_parts[name][family.name] for name in names])
            reference_sums = np.stack([token_parts[name][family.name] for name in runs[reference]])
            total, rows = decompose_gap(
                run_sums,
                reference_sums,
                token_parts["base"][family.name],
                tokens,
                tree_ids,
                family.labels,
                resamples,
                seed,
            )
            families_out[family.name] = [row.to_dict() for row in rows if row.tokens]
        result[run] = {"total_gap": total, "total_ratio": math.exp(total), "families": families_out}
    return result


def largest_gap_bucket(gap: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """(family, bucket row) with the largest share of the gap, over every family of one run."""
    best = None
    for family, rows in gap["families"].items():
        row = largest_bucket([BucketGap(**r) for r in rows])
        if row is None or gap["total_gap"] == 0:
            continue
        share = row.gap_contribution / gap["total_gap"]
        if best is None or share > best[2]:
            best = (family, row.to_dict(), share)
    return (best[0], best[1]) if best else None


def most_concentrated_bucket(gap: dict[str, Any], least_share: float = 0.05) -> Optional[tuple[str, dict[str, Any]]]:
    """(family, bucket row) whose share of the gap most exceeds its share of the tokens, among buckets holding at
    least `least_share` of the tokens (a handful of tokens makes any ratio)."""
    if gap["total_gap"] == 0:
        return None
    candidates = [
        (row["gap_contribution"] / gap["total_gap"] / row["token_share"], family, row)
        for family, rows in gap["families"].items()
        for row in rows
        if row["token_share"] >= least_share
    ]
    if not candidates:
        return None
    _, family, row = max(candidates, key=lambda candidate: candidate[0])
    return family, row


def weights_summary(
    weight_parts: dict[str, dict[str, np.ndarray]],
    runs: dict[str, list[str]],
    methods: dict[str, str],
    ranks: dict[str, Optional[int]],
    reference: Optional[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per run, per module: effective rank, rank_90 and intruder count (means over seeds), full FT's energy at the
    LoRA ranks, and for LoRA the subspace similarity to full FT's change beside LoRA seed against seed."""
    lora_ranks = sorted({rank for rank in ranks.values() if rank})
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for run, names in runs.items():
        modules = sorted(set.intersection(*(set(weight_parts[name]["modules"].tolist()) for name in names)))
        per_module = {}
        for module in modules:
            parts = [weight_parts[name] for name in names]
            layer, kind = module_position(module)
            entry: dict[str, Any] = {
                "layer": layer,
                "kind": kind,
                "effective_rank": float(np.mean([part[f"{module}/effective_rank"] for part in parts])),
                "rank_90": float(np.mean([part[f"{module}/rank_90"] for part in parts])),
                "intruders": float(np.mean([len(part[f"{module}/intruders"]) for part in parts])),
            }
            reference_parts = [weight_parts[name] for name in runs.get(reference, [])] if reference else []
            if reference_parts and all(f"{module}/singular_values" in part for part in reference_parts):
                wanted = lora_ranks if run == reference else [ranks[run]]
                entry["energy_at_rank"] = {
                    str(rank): float(
                        np.mean(
                            [
                                energy_at_rank(_tensor(part[f"{module}/singular_values"]), rank)
                                for part in reference_parts
                            ]
                        )
                    )
                    for rank in wanted
                    if rank
                }
                if methods[run] == "lora" and run != reference:
                    entry.update(_similarities(parts, reference_parts, module, ranks[run]))
            per_module[module] = entry
        result[run] = per_module
    return result


def _tensor(values: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _left(part: dict[str, np.ndarray], module: str):
    return _tensor(part[f"{module}/left"])


def _similarities(parts, reference_parts, module: str, rank: int) -> dict[str, Optional[float]]:
    """phi(LoRA seed s, full FT seed s, r, r) averaged over seeds, and phi between LoRA seeds (the noise reference:
    how alike two trainings of the same method are); r/out is what random subspaces give."""
    rank = min(rank, parts[0][f"{module}/left"].shape[1], reference_parts[0][f"{module}/left"].shape[1])
    to_reference = [
        subspace_similarity(_left(part, module), _left(reference, module), rank, rank)
        for part, reference in zip(parts, reference_parts)
    ]
    between_seeds = [
        subspace_similarity(_left(a, module), _left(b, module), rank, rank) for a, b in itertools.combinations(parts, 2)
    ]
    return {
        "subspace_similarity_to_reference": float(np.mean(to_reference)),
        "subspace_similarity_between_seeds": float(np.mean(between_seeds)) if between_seeds else None,
        "subspace_similarity_random": rank / parts[0][f"{module}/left"].shape[0],
    }


def rank_by_kind(weights: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean rank_90 over layers, per module kind, of one run."""
    kinds: dict[str, list[float]] = {}
    for entry in weights.values():
        kinds.setdefault(entry["kind"], []).append(entry["rank_90"])
    return {kind: float(np.mean(values)) for kind, values in sorted(kinds.items())}


def mitigation_curves(
    parts: dict[str, list[dict[str, Any]]],
    per_response: dict[str, np.ndarray],
    extra_prefix: str,
    reference_training: Optional[str],
) -> dict[str, Any]:
    """Per mitigated training: test perplexity and forgetting (change in NLL per token on the general text from the
    base) at each lambda, with lambda 1 (the weights as trained) from the evaluation; full FT's point beside them."""
    base_extra = per_response.get(f"{extra_prefix}base/nll")
    extra_tokens = per_response.get(f"{extra_prefix}base/tokens")

    def forgetting(nll_sum: Optional[float]) -> Optional[float]:
        if nll_sum is None or base_extra is None:
            return None
        return float((nll_sum - base_extra.sum()) / extra_tokens.sum())

    def evaluated(name: str) -> dict[str, Any]:
        extra = per_response.get(f"{extra_prefix}{name}/nll")
        return {
            "test_perplexity": math.exp(per_response[f"{name}/nll"].sum() / per_response[f"{name}/tokens"].sum()),
            "forgetting": forgetting(float(extra.sum()) if extra is not None else None),
        }

    curves = {}
    for name, points in parts.items():
        curve = [
            {
                "lambda": point["lambda"],
                "test_perplexity": math.exp(point["test_nll"] / point["test_tokens"]),
                "forgetting": forgetting(point.get("extra_nll")),
                "modules_changed": point["modules_changed"],
            }
            for point in points
        ]
        curve.append({"lambda": 1.0, **evaluated(name), "modules_changed": 0})
        curves[name] = sorted(curve, key=lambda point: point["lambda"])
    reference_point = evaluated(reference_training) if reference_training else None
    return {"trainings": curves, "reference": {"training": reference_training, **(reference_point or {})}}


def worst_responses(
    per_response: dict[str, np.ndarray],
    names: list[str],
    reference_names: list[str],
    count: int,
) -> list[dict[str, Any]]:
    """The test responses where the run's NLL sum exceeds full FT's the most (mean over seeds): their index, both
    NLLs per token and the difference in nats (what the response adds to the gap's numerator)."""
    tokens = per_response["base/tokens"]
    run = np.mean([per_response[f"{name}/nll"] for name in names], axis=0)
    reference = np.mean([per_response[f"{name}/nll"] for name in reference_names], axis=0)
    order = np.argsort(-(run - reference), kind="stable")[:count]
    return [
        {
            "index": int(index),
            "message_id": str(per_response["message_id"][index]),
            "tokens": int(tokens[index]),
            "nll_per_token": float(run[index] / tokens[index]),
            "reference_nll_per_token": float(reference[index] / tokens[index]),
            "nll_difference": float(run[index] - reference[index]),
        }
        for index in order
    ]
