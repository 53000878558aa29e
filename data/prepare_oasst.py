"""Stage 1: OASST1 assistant responses -> filtered, tokenized sequences on disk (data/processed by default)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.config import PrepareConfig, parse_config  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.prepare import prepare  # noqa: E402


@report_user_errors
def main() -> None:
    prepare(parse_config(PrepareConfig, __doc__))


if __name__ == "__main__":
    main()
