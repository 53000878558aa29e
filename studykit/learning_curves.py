"""Learning curves and where LoRA leaves full fine-tuning's: dev loss at log-spaced steps, the seeds' spread as a band,
and the departure point, the first point from which a run's band stays apart from the reference's.

"LoRA Without Regret" (Thinking Machines, 2025): LoRA follows full fine-tuning's learning curve until the data holds
more than the adapter can absorb, then falls away, the earlier the lower its rank. These curves read the dev split
only, as every choice does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

# TrainConfig.eval_schedule: "interval" scores the dev split every --eval-every steps and at the end; "log" also at
# steps 1, 2, 4, 8, ..., so a learning curve has points on a log axis from the first step.
EVAL_SCHEDULES = ("interval", "log")


def is_log_step(step: int) -> bool:
    """Steps 1, 2, 4, 8, ...: a power of two."""
    return step >= 1 and step & (step - 1) == 0


def dev_loss_steps(total_steps: int, eval_every: int, schedule: str) -> list[int]:
    """The optimizer steps after which the trainer scores the dev split (1-based, as log.jsonl counts them)."""
    return [
        step
        for step in range(1, total_steps + 1)
        if step == total_steps or (eval_every and step % eval_every == 0) or (schedule == "log" and is_log_step(step))
    ]


@dataclasses.dataclass
class SeedCurves:
    """One run's dev loss at the steps every seed's log holds: losses[seed][point]."""

    steps: list[int]
    tokens: list[float]  # training tokens seen by each step (mean over seeds: the same data order makes them equal)
    losses: list[list[float]]

    def band(self, point: int) -> tuple[float, float]:
        values = [seed[point] for seed in self.losses]
        return min(values), max(values)

    def mean(self, point: int) -> float:
        return sum(seed[point] for seed in self.losses) / len(self.losses)


def seed_curves(logs: Sequence[Sequence[dict[str, Any]]]) -> Optional[SeedCurves]:
    """The dev-loss points of each seed's log.jsonl, at the steps all of them scored; None when there are none."""
    by_seed = [{entry["step"]: entry for entry in log if entry.get("dev_loss") is not None} for log in logs]
    if not by_seed:
        return None
    steps = sorted(set.intersection(*(set(points) for points in by_seed)))
    if not steps:
        return None
    tokens = [sum(points[step]["tokens_seen"] for points in by_seed) / len(by_seed) for step in steps]
    return SeedCurves(steps, tokens, [[points[step]["dev_loss"] for step in steps] for points in by_seed])


@dataclasses.dataclass
class Departure:
    """Where a run's dev-loss curve leaves the reference's for good: `index` into the shared points, or None."""

    index: Optional[int]
    side: Optional[str]  # "above" (worse than the reference) or "below"
    judged: bool  # False with one seed on either side: there is no spread to be outside of

    def describe(self, steps: Sequence[int], tokens: Sequence[float]) -> str:
        if not self.judged:
            return "not judged (one seed: no spread)"
        if self.index is None:
            return "never left"
        return f"step {steps[self.index]:,} ({tokens[self.index]:,.0f} tokens), {self.side}"


def side_at(reference: SeedCurves, run: SeedCurves, point: int) -> Optional[str]:
    """ "above" when every seed of `run` is above every seed of the reference at this point, "below" when every one is
    below, None when the two bands of seeds overlap."""
    low, high = run.band(point)
    reference_low, reference_high = reference.band(point)
    if low > reference_high:
        return "above"
    if high < reference_low:
        return "below"
    return None


def departure(reference: SeedCurves, run: SeedCurves) -> Departure:
    """The first point from which, at every later point too, the run's seeds all lie on one side of the reference's
    seeds (the gap stays outside the seeds' spread). Both must have the same points (the same schedule and steps)."""
    if len(reference.losses) < 2 or len(run.losses) < 2:
        return Departure(None, None, False)
    count = min(len(reference.steps), len(run.steps))
    sides = [side_at(reference, run, point) for point in range(count)]
    if not sides or sides[-1] is None:
        return Departure(None, None, True)
    first = count - 1
    while first > 0 and sides[first - 1] == sides[-1]:
        first -= 1
    return Departure(first, sides[-1], True)


def curves_summary(reference_name: str, curves: dict[str, SeedCurves]) -> dict[str, Any]:
    """For results.json: each run's points (steps, tokens, mean and band) and its departure from the reference."""
    reference = curves.get(reference_name)
    summary = {}
    for name, curve in curves.items():
        entry: dict[str, Any] = {
            "steps": curve.steps,
            "tokens": curve.tokens,
            "mean_dev_loss": [curve.mean(point) for point in range(len(curve.steps))],
            "band": [list(curve.band(point)) for point in range(len(curve.steps))],
            "seeds": len(curve.losses),
        }
        if reference is not None and name != reference_name:
            found = departure(reference, curve)
            entry["departure"] = {
                "step": curve.steps[found.index] if found.index is not None else None,
                "tokens": curve.tokens[found.index] if found.index is not None else None,
                "side": found.side,
                "judged": found.judged,
                "text": found.describe(curve.steps, curve.tokens),
            }
        summary[name] = entry
    return summary
