"""Build a tiny GPT-2 with its own tokenizer, pre-trained briefly on the shipped general English text (offline).

The quick study builds the same model itself ([tiny_model] in studies/quick.toml); this script is for the stages run
by hand. --pretrain-steps 0 gives the randomly initialised model.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.dependency_logs import VERBOSE_FLAG, VERBOSE_HELP, quiet_dependencies  # noqa: E402
from studykit.errors import report_user_errors  # noqa: E402
from studykit.tiny import build_pretrained_tiny_gpt2  # noqa: E402


@report_user_errors
def main() -> None:
    quiet_dependencies(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default=".quick/tiny-gpt2", help="where the model and tokenizer are saved")
    parser.add_argument(
        "--data-file", default="data/sample/oasst_sample.jsonl", help="OASST texts the tokenizer is trained on"
    )
    parser.add_argument(
        "--general-text", default="data/sample/general_text.txt", help="English text the model is pre-trained on"
    )
    parser.add_argument(
        "--heldout-text", default="data/sample/general_text_heldout.txt", help="text scored before and after"
    )
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n-embd", type=int, default=64, help="hidden size")
    parser.add_argument(
        "--pretrain-steps", type=int, default=400, help="pre-training steps on the general text (0: random model)"
    )
    parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args()
    note = build_pretrained_tiny_gpt2(
        Path(args.output_dir),
        Path(args.data_file),
        Path(args.general_text),
        args.vocab_size,
        args.n_layer,
        args.n_embd,
        args.pretrain_steps,
        heldout_text_file=Path(args.heldout_text),
    )
    print(f"wrote {args.output_dir}: {note.note}")


if __name__ == "__main__":
    main()
