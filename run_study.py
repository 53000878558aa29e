"""The whole controlled study in one command: prepare -> every training run -> evaluation -> report.

`python run_study.py` runs studies/default.toml (GPT-2 Small, OASST1 from the hub: full FT, LoRA r=8, LoRA r=32 under
one budget); `--preset quick` a tiny offline study on a CPU; `--config PATH` a study file of your own. Steps whose
inputs have not changed are kept; `--dry-run` prints the plan.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from studykit.cli import study_main  # noqa: E402

if __name__ == "__main__":
    study_main(__doc__)
