"""A study's [analysis]: where and why LoRA falls short of full fine-tuning (the analysis stage, studykit.analysis)."""

from __future__ import annotations

import dataclasses

from studykit.config import option
from studykit.errors import UserError


@dataclasses.dataclass
class AnalysisConfig:
    """The gap by token, the weight change, the intruder-dimension check. The verdict's margin is [report]
    equivalence_margin, fixed before results are seen."""

    enabled: bool = option(True, "run the analysis after evaluation (false: the study stops at the report)")
    intruder_top_k: int = option(
        10, "singular vectors of each trained matrix tested for intruders, largest first (Shuttleworth et al.: 10)"
    )
    intruder_epsilon: float = option(
        0.5, "a top singular vector is an intruder when its largest |cosine| with the base's is below this"
    )
    mitigation_lambdas: list[float] = option(
        [0.0, 0.25, 0.5, 0.75],
        "scales of the intruder directions scored in the mitigation check (1, the trained weights, is the evaluation)",
    )
    worst_responses: int = option(5, "test responses listed where each LoRA run falls furthest behind full FT")

    def validate(self) -> None:
        if self.intruder_top_k < 1 or not 0 < self.intruder_epsilon <= 1 or self.worst_responses < 0:
            raise UserError(
                "intruder_top_k must be at least 1, intruder_epsilon in (0, 1] and worst_responses at least 0."
            )
        if any(value < 0 or value > 1 for value in self.mitigation_lambdas):
            raise UserError("mitigation_lambdas must lie in [0, 1] (1 keeps the intruders as trained, 0 removes them).")
