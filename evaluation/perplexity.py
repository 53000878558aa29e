"""Stage 4: held-out perplexity, exp(total NLL / total predicted tokens), for the base model and every run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.config import EvalConfig, parse_config  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.evaluate import evaluate  # noqa: E402


@report_user_errors
def main() -> None:
    evaluate(parse_config(EvalConfig, __doc__))


if __name__ == "__main__":
    main()
