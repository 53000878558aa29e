"""Build a tiny GPT-2 with its own tokenizer, pre-trained briefly on the shipped general English text (offline).

The quick study builds the same model itself ([tiny_model] in studies/quick.toml, the same settings as these flags);
this script is for the stages run by hand. --pretrain-steps 0 gives the randomly initialised model.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.config import option, parse_config  # noqa: E402
from studykit.dependency_logs import quiet_dependencies  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.study_config import TinyModelConfig
from studykit.tiny import build_from_config  # noqa: E402


@dataclasses.dataclass
class TinyModelCommand(TinyModelConfig):
    output_dir: str = option(".quick/tiny-gpt2", "where the model and tokenizer are saved")


@report_user_errors
def main() -> None:
    quiet_dependencies(sys.argv[1:])
    command = parse_config(TinyModelCommand, __doc__)
    settings = {key: value for key, value in dataclasses.asdict(command).items() if key != "output_dir"}
    note = build_from_config(Path(command.output_dir), TinyModelConfig(**settings))
    print(f"wrote {command.output_dir}: {note.note}")


if __name__ == "__main__":
    main()
