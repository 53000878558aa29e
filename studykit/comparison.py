"""The study's comparison as numbers: per run, the chosen learning rate and its test perplexity over seeds and
conversation trees, the paired ratio to the reference run, forgetting as a change from the base model, the cost, and
what of the budget differs from the reference. Typed rows; report_markdown formats them and report writes them.

Every number is read from what the stages wrote: run.json of each training and the evaluation's per-response scores
of the test split. The learning rates were chosen before, on the dev split alone (study_state.sweep_result).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from studykit.errors import UserError
from studykit.falling_behind import references_by_fraction
from studykit.methods import METHODS
from studykit.response_scores import EXTRA_EVAL_PREFIX
from studykit.run_state import RunRecord
from studykit.statistics import (
    CONFIDENCE,
    nll_change_seeds,
    paired_ratio_seeds_and_trees,
    pareto_front,
    seeds_and_trees,
)
from studykit.study_file import Study, Training
from studykit.study_tables import RunSpec

# What two trainings of the same seed must share to be compared: recorded in run.json. The learning rate is left out
# on purpose (each method is tuned on dev); `kernels` (attention, MLP activation, loss) so both are computed alike.
# `optimizer` so both take the same kind of step (8-bit moments move the weights a little differently from fp32 ones).
BUDGET_FIELDS = (
    "training_data_fingerprint",
    "dev_fingerprint",
    "seq_len",
    "effective_batch",
    "steps",
    "seed",
    "packing",
    "kernels",
    "precision",
    "optimizer",
)
# The same, from the training settings: the order of examples and everything about the optimizer but its rate.
BUDGET_SETTINGS = (
    "train_fraction",
    "group_by_length",
    "warmup_ratio",
    "lr_schedule",
    "weight_decay",
    "max_grad_norm",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)
# The costs a Pareto front is drawn over (lower is better, as for perplexity).
PARETO_COSTS = ("peak_memory_bytes", "wall_time_seconds", "train_flops")


@dataclass
class TestPerplexity:
    """statistics.seeds_and_trees: the mean over seeds of each seed's test perplexity, and its interval."""

    mean_perplexity: float
    seed_perplexities: list[float]
    seed_std: Optional[float]
    seed_range: tuple[float, float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    seed_count: int
    tree_count: int
    covers: str


@dataclass
class PerplexityRatio:
    """statistics.paired_ratio_seeds_and_trees: a run's perplexity over the reference's, seed by seed."""

    ratio: float
    seed_ratios: list[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    seed_count: int
    tree_count: int
    covers: str


@dataclass
class Forgetting:
    """statistics.nll_change_seeds: the change in NLL per token on the general text from the base model."""

    change: float
    seed_changes: list[float]
    seed_std: Optional[float]
    seed_range: tuple[float, float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    seed_count: int
    text_count: int
    covers: str


@dataclass
class SweepSummary:
    """study_state.SweepResult as the report keeps it: dev loss and perplexity by repr(learning rate)."""

    run: str
    learning_rates: list[float]
    dev_loss: dict[str, Optional[float]]
    dev_perplexity: dict[str, Optional[float]]
    chosen_lr: Optional[float]
    at_edge: bool
    added: list[dict[str, Any]] = field(default_factory=list)  # rates added beyond the grid's ends, and why
    grid_extensions: int = 0  # the bound on added rates
    diverged: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class BaseRow:
    """The base model, untrained: the floor every run is read against."""

    name: str
    method: str = "base"
    description: str
    trainable_params: int = 0
    total_params: int
    trainable_percent: float = 0.0
    test: TestPerplexity
    test_tokens: int
    test_responses: int
    extra_eval_perplexity: Optional[float]


@dataclass(kw_only=True)
class RunRow:
    """A run at its chosen learning rate, over every seed; costs are means over the seeds."""

    name: str
    method: str
    description: str
    lr: float
    sweep: SweepSummary
    seeds: list[int]
    trainable_params: int
    total_params: int
    trainable_percent: float
    test: TestPerplexity
    trainings: list[str]
    vs_reference: Optional[PerplexityRatio] = None
    # What the ratio compares with: full FT, or full FT trained on the same --train-fraction of the data.
    reference: Optional[str] = None
    forgetting: Optional[Forgetting] = None
    steps: Optional[float]
    tokens_seen: Optional[float]
    wall_time_seconds: Optional[float]
    tokens_per_second: Optional[float]
    mfu: Optional[float]
    peak_memory_bytes: Optional[float]
    checkpoint_bytes: Optional[float]
    effective_batch: Optional[float]
    peak_memory_kind: str
    train_flops: float
    budget_differences: dict[str, Any]
    trained_on_other_data: bool


Row = Union[BaseRow, RunRow]


@dataclass
class TrainingEntry:
    """Every finished training, chosen or not: results.json keeps them all."""

    name: str
    run: str
    lr: float
    seed: int
    final_dev_loss: Optional[float]
    dev_perplexity: Optional[float]
    steps: int
    wall_time_seconds: Optional[float]
    tokens_per_second: Optional[float]
    peak_memory_bytes: Optional[int]
    skipped_steps: Any
    test_perplexity: Optional[float] = None


@dataclass
class Comparison:
    reference_run: Optional[str]
    confidence: float
    bootstrap_resamples: int
    seeds: list[int]
    sweep_seeds: list[int]
    budget_fields: list[str]
    base: BaseRow
    runs: list[RunRow]
    trainings: list[TrainingEntry]
    evaluated_trainings: list[str]
    pareto_front: dict[str, list[str]] = field(default_factory=dict)
    # falling_behind's: each run's dev-loss curve and departure from full FT, and the gap by data size (or None).
    learning_curves: dict[str, Any] = field(default_factory=dict)
    data_size: Optional[dict[str, Any]] = None

    @property
    def rows(self) -> list[Row]:
        return [self.base, *self.runs]

    def to_dict(self) -> dict[str, Any]:
        """results.json's shape: rows as one list, optional parts left out where a row has none."""
        rows = [_without_none(dataclasses.asdict(row), ("vs_reference", "forgetting")) for row in self.rows]
        trainings = [_without_none(dataclasses.asdict(entry), ("test_perplexity",)) for entry in self.trainings]
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        del values["base"], values["runs"]
        return {**values, "rows": rows, "trainings": trainings}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Comparison":
        """Read back from results.json (what the README's block is made from)."""
        base, *runs = values["rows"]
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(
            **{key: value for key, value in values.items() if key in known and key not in ("trainings",)},
            base=BaseRow(**{**base, "test": TestPerplexity(**base["test"])}),
            runs=[_run_row(row) for row in runs],
            trainings=[TrainingEntry(**entry) for entry in values["trainings"]],
        )


def _without_none(values: dict[str, Any], optional: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if not (key in optional and value is None)}


def _run_row(row: dict[str, Any]) -> RunRow:
    return RunRow(
        **{
            **row,
            "test": TestPerplexity(**row["test"]),
            "sweep": SweepSummary(**row["sweep"]),
            "vs_reference": PerplexityRatio(**row["vs_reference"]) if row.get("vs_reference") else None,
            "forgetting": Forgetting(**row["forgetting"]) if row.get("forgetting") else None,
        }
    )


def budget_of(record: RunRecord) -> dict[str, Any]:
    return {
        **{key: getattr(record, key) for key in BUDGET_FIELDS},
        **{key: record.config.get(key) for key in BUDGET_SETTINGS},
    }


def budget_differences(records: dict[str, RunRecord], reference: str) -> dict[str, dict[str, Any]]:
    """For each training, the budget fields whose value differs from the reference training's: {name: {field:
    value}}."""
    expected = budget_of(records[reference])
    return {
        name: {key: value for key, value in budget_of(record).items() if value != expected[key]}
        for name, record in records.items()
    }


def describe(record: Optional[RunRecord]) -> str:
    return "base (no training)" if record is None else METHODS[record.method].describe(record)


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def build_comparison(
    study: Study,
    sweeps: dict[str, Any],
    eval_rows: list[dict[str, Any]],
    per_response: dict[str, np.ndarray],
    chosen: dict[str, list[Training]],
    records: dict[str, RunRecord],
) -> Comparison:
    """Rows for the base model and every run (its chosen rate, every seed), the sweeps and every training."""
    rows_by_name = {row["name"]: row for row in eval_rows}
    missing = [t.name for trainings in chosen.values() for t in trainings if t.name not in rows_by_name]
    if missing:
        raise UserError(
            f"the evaluation has no rows for training(s) {missing[:3]}; run the study again so it evaluates them."
        )
    resamples, seed = study.report.bootstrap_resamples, study.report.bootstrap_seed
    tokens, tree_ids = per_response["base/tokens"], per_response["message_tree_id"]
    extra_tokens = per_response.get(f"{EXTRA_EVAL_PREFIX}base/tokens")
    reference = next((spec.name for spec in study.runs if METHODS[spec.method].reference), None)

    def nll_by_seed(run: str, prefix: str = "") -> np.ndarray:
        return np.stack([per_response[f"{prefix}{training.name}/nll"] for training in chosen[run]])

    base = BaseRow(
        name="base",
        description=describe(None),
        total_params=rows_by_name["base"]["total_params"],
        test=TestPerplexity(**seeds_and_trees(per_response["base/nll"][None], tokens, tree_ids, resamples, seed)),
        test_tokens=int(tokens.sum()),
        test_responses=len(tokens),
        extra_eval_perplexity=rows_by_name["base"].get("extra_eval_perplexity"),
    )
    # A run on a share of the training data (--train-fraction) is compared with full fine-tuning on the same share.
    references = references_by_fraction(study)
    runs = []
    for spec in study.runs:
        run_reference = references.get(spec.config.train_fraction, reference)
        reference_records = {t.seed: records[t.name] for t in chosen[run_reference]} if run_reference else {}
        seed_records = [records[t.name] for t in chosen[spec.name]]
        first = seed_records[0]
        # Each seed against the reference's training of the same seed: the same data order is what pairs them.
        differences: dict[str, Any] = {}
        for training, record in zip(chosen[spec.name], seed_records):
            if training.seed in reference_records:
                pair = {"reference": reference_records[training.seed], training.name: record}
                differences.update(budget_differences(pair, "reference")[training.name])
        costs = {
            key: mean([getattr(record, key) for record in seed_records])
            for key in (
                "steps",
                "tokens_seen",
                "wall_time_seconds",
                "tokens_per_second",
                "mfu",
                "peak_memory_bytes",
                "checkpoint_bytes",
                "effective_batch",
            )
        }
        runs.append(
            RunRow(
                name=spec.name,
                method=spec.method,
                description=describe(first),
                lr=chosen[spec.name][0].lr,
                sweep=SweepSummary(**sweeps[spec.name]),
                seeds=[t.seed for t in chosen[spec.name]],
                trainable_params=first.trainable_params,
                total_params=first.total_params,
                trainable_percent=100.0 * first.trainable_params / first.total_params,
                test=TestPerplexity(**seeds_and_trees(nll_by_seed(spec.name), tokens, tree_ids, resamples, seed)),
                trainings=[t.name for t in chosen[spec.name]],
                **costs,
                peak_memory_kind=first.peak_memory_kind,
                train_flops=first.flops_per_token * costs["tokens_seen"],
                budget_differences=differences,
                trained_on_other_data=any(rows_by_name[t.name].get("trained_on_other_data") for t in chosen[spec.name]),
                vs_reference=PerplexityRatio(
                    **paired_ratio_seeds_and_trees(
                        nll_by_seed(spec.name), nll_by_seed(run_reference), tokens, tree_ids, resamples, seed
                    )
                )
                if run_reference and spec.name != run_reference
                else None,
                reference=run_reference,
                forgetting=Forgetting(
                    **nll_change_seeds(
                        nll_by_seed(spec.name, EXTRA_EVAL_PREFIX),
                        per_response[f"{EXTRA_EVAL_PREFIX}base/nll"],
                        extra_tokens,
                        resamples,
                        seed,
                    )
                )
                if extra_tokens is not None
                else None,
            )
        )
    trainings = [
        training_entry(study, spec, lr, training_seed, records, rows_by_name)
        for spec in study.runs
        for lr in sweeps[spec.name]["learning_rates"]
        for training_seed in study.seeds
        if study.training(spec, lr, training_seed).name in records
    ]
    comparison = Comparison(
        reference_run=reference,
        confidence=CONFIDENCE,
        bootstrap_resamples=resamples,
        seeds=study.seeds,
        sweep_seeds=study.sweep_seeds,
        budget_fields=[*BUDGET_FIELDS, *BUDGET_SETTINGS],
        base=base,
        runs=runs,
        trainings=trainings,
        evaluated_trainings=sorted(t.name for trainings in chosen.values() for t in trainings),
    )
    comparison.pareto_front = {cost: pareto_runs(comparison, cost) for cost in PARETO_COSTS}
    return comparison


def training_entry(
    study: Study, spec: RunSpec, lr: float, seed: int, records: dict[str, RunRecord], rows_by_name: dict[str, Any]
) -> TrainingEntry:
    name = study.training(spec, lr, seed).name
    record = records[name]
    return TrainingEntry(
        name=name,
        run=spec.name,
        lr=lr,
        seed=seed,
        final_dev_loss=record.final_dev_loss,
        dev_perplexity=math.exp(record.final_dev_loss) if record.final_dev_loss is not None else None,
        steps=record.steps,
        wall_time_seconds=record.wall_time_seconds,
        tokens_per_second=record.tokens_per_second,
        peak_memory_bytes=record.peak_memory_bytes,
        skipped_steps=record.skipped_steps,
        test_perplexity=rows_by_name[name]["perplexity"] if name in rows_by_name else None,
    )


def pareto_runs(comparison: Comparison, cost: str) -> list[str]:
    runs = comparison.runs
    front = pareto_front([getattr(row, cost) for row in runs], [row.test.mean_perplexity for row in runs])
    return [runs[index].name for index in front]
