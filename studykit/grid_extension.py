"""Learning-rate grids that widen themselves: when the rate with the lowest dev loss lies at an end of its run's grid,
the best rate may lie beyond it, so the next rate past that end (at the grid's own spacing) is trained with the sweep
seeds and the choice is made again, up to [budget] grid_extensions times per run. The choice reads dev losses only.

A training that diverged (stopped on a NaN loss) counts as the worst rate, never as an error; one whose final dev loss
lies more than FAR_ABOVE_NATS above the best rate's is labelled diverged too (the lowest-loss choice already ranks it
last).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

# [budget] grid_extensions when the study file does not say: two more rates at most on the side the choice points to.
DEFAULT_GRID_EXTENSIONS = 2
# A rate whose mean final dev loss is this far above the best rate's (e^1.0: 2.7x the perplexity) is reported as
# diverged rather than merely worse. Fixed before any result was seen; it labels, it never chooses.
FAR_ABOVE_NATS = 1.0


@dataclasses.dataclass
class Extension:
    """One rate added to a run's grid: which, on which side, and why."""

    lr: float
    side: str  # "above" or "below" the grid
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rounded(lr: float) -> float:
    """Six significant digits: 1e-3 x 3 is 3e-3, not 0.0030000000000000005, so names and configs stay exact."""
    return float(f"{lr:.6g}")


def on_the_one_three_ladder(lr: float) -> bool:
    """1 or 3 times a power of ten (to six digits): the half-decade grids the studies use."""
    mantissa = float(f"{lr:.6e}".split("e")[0])
    return mantissa in (1.0, 3.0)


def rate_beyond(grid: Sequence[float], side: str) -> float:
    """The next rate past the grid's top ("above") or bottom ("below") at the grid's own log spacing: its mean step
    in log space (1e-6, 2e-6 -> 4e-6). A grid of half-decade steps on the 1-3-10 ladder goes on along it
    (1e-4, 3e-4, 1e-3 -> 3e-3 above, 3e-5 below; 3e-4, 1e-3 -> 3e-3), where the exact step would give 3.16e-3."""
    rates = sorted(grid)
    if len(rates) < 2:
        raise ValueError("a grid of one rate has no spacing to repeat")
    if side not in ("above", "below"):
        raise ValueError(f"side is 'above' or 'below', not {side!r}")
    step = math.log10(rates[-1] / rates[0]) / (len(rates) - 1)
    edge = rates[-1] if side == "above" else rates[0]
    target = edge * 10 ** (step if side == "above" else -step)
    if abs(step - 0.5) < 0.05 and all(on_the_one_three_ladder(lr) for lr in rates):
        decade = math.floor(math.log10(target))
        ladder = [mantissa * 10.0**exponent for exponent in (decade - 1, decade, decade + 1) for mantissa in (1, 3)]
        target = min(ladder, key=lambda lr: abs(math.log10(lr / target)))
    return rounded(target)


def edge_side(grid: Sequence[float], chosen: float) -> Optional[str]:
    """Where the chosen rate lies: "above" (the grid's largest), "below" (its smallest), or None (inside)."""
    rates = sorted(grid)
    if len(rates) < 2:
        return None
    if math.isclose(chosen, rates[-1], rel_tol=1e-9):
        return "above"
    if math.isclose(chosen, rates[0], rel_tol=1e-9):
        return "below"
    return None


def lowest(dev_losses: dict[float, Optional[float]]) -> Optional[float]:
    """The rate with the lowest finite dev loss; a rate with none (diverged, NaN) is never chosen."""
    finite = {lr: loss for lr, loss in dev_losses.items() if loss is not None and math.isfinite(loss)}
    return min(finite, key=finite.get) if finite else None


def diverged_rates(dev_losses: dict[float, Optional[float]]) -> list[float]:
    """Rates that diverged: no finite dev loss, or one more than FAR_ABOVE_NATS above the best rate's."""
    best = lowest(dev_losses)
    floor = dev_losses[best] if best is not None else None
    return sorted(
        lr
        for lr, loss in dev_losses.items()
        if loss is None or not math.isfinite(loss) or (floor is not None and loss > floor + FAR_ABOVE_NATS)
    )


def extension_for(grid: Sequence[float], chosen: float, added_so_far: int, bound: int) -> Optional[Extension]:
    """The rate to add after choosing `chosen` from `grid`, or None: the choice lies inside the grid, or `bound`
    extensions are already made (the bound stopped the search: the report flags the edge)."""
    side = edge_side(grid, chosen)
    if side is None or added_so_far >= bound:
        return None
    lr = rate_beyond(grid, side)
    end = "largest" if side == "above" else "smallest"
    return Extension(
        lr,
        side,
        f"lr {chosen:g} had the lowest dev loss and was the {end} rate of {[float(f'{r:g}') for r in sorted(grid)]}; "
        f"the best rate may lie {side} it (extension {added_so_far + 1} of at most {bound})",
    )
