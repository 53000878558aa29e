"""Stage 4: held-out perplexity, exp(total NLL / total predicted tokens), for the base model and every run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    evaluate_main(__doc__)
