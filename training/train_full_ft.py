"""Stage 2: full fine-tuning. Every weight trains; AdamW, mixed precision on CUDA, runs under `accelerate launch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.config import TrainConfig, parse_config  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.trainer import full_model, train  # noqa: E402


@report_user_errors
def main() -> None:
    config = parse_config(TrainConfig, __doc__)
    train(config, full_model)


if __name__ == "__main__":
    main()
