"""A study's [analysis] (where and why LoRA falls short of full fine-tuning: studykit.analysis), and its [report] with
the verdict's margin.

Both live here rather than in config.py on purpose: config.py is in the training code's import closure, so a field
added there gives every training a new code version and retrains every study.
"""

from __future__ import annotations

import dataclasses

from studykit.config import option
from studykit.errors import UserError
from studykit.study_config import ReportConfig


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


@dataclasses.dataclass
class StudyReportConfig(ReportConfig):
    """A study's [report]: the bootstrap, the samples, and the verdict's margin."""

    equivalence_margin: float = option(
        0.05,
        "the verdict's margin, fixed before results are seen: a LoRA run is equivalent to full FT when the 90% "
        "interval of its perplexity ratio lies within (1/(1+m), 1+m) (0.05: 5%)",
    )

    def validate(self) -> None:
        super().validate()
        if not 0 < self.equivalence_margin < 1:
            raise UserError(f"equivalence_margin must lie in (0, 1) (got {self.equivalence_margin}); 0.05 is 5%.")
