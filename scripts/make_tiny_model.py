"""Build a tiny, randomly initialised GPT-2 with a tokenizer trained on the shipped sample (offline)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.tiny import build_tiny_gpt2, sample_texts, train_byte_level_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default=".quick/tiny-gpt2", help="where the model and tokenizer are saved")
    parser.add_argument("--data-file", default="data/sample/oasst_sample.jsonl", help="texts the tokenizer is trained on")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    args = parser.parse_args()
    tokenizer = train_byte_level_tokenizer(sample_texts(Path(args.data_file)), args.vocab_size)
    path = build_tiny_gpt2(Path(args.output_dir), tokenizer, n_layer=args.n_layer, n_embd=args.n_embd)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
