"""The whole controlled study in one command: prepare -> every training run -> evaluation -> report.

`python run_study.py` runs studies/default.toml (GPT-2 Small, OASST1 from the hub: full FT, LoRA r=8, LoRA r=32 under
one budget); `--preset quick` a tiny offline study on a CPU; `--config PATH` a study file of your own. Steps whose
inputs have not changed are kept; `--dry-run` prints the plan.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from studykit.errors import report_user_errors  # noqa: E402
from studykit.study import parse_study_args, run_study  # noqa: E402


@report_user_errors
def main() -> None:
    run_study(parse_study_args(__doc__))


if __name__ == "__main__":
    main()
