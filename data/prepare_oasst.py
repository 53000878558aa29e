"""Stage 1: OASST1 assistant responses -> filtered, tokenized sequences on disk (data/processed by default)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.cli import prepare_main  # noqa: E402

if __name__ == "__main__":
    prepare_main(__doc__)
