"""Stage 3: LoRA. The base model is frozen; adapters on attention c_attn and attention c_proj train by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.config import LoraTrainConfig, parse_config  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.trainer import lora_wrapper, train  # noqa: E402


@report_user_errors
def main() -> None:
    config = parse_config(LoraTrainConfig, __doc__)
    train(config, lora_wrapper(config))


if __name__ == "__main__":
    main()
