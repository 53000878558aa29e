"""Stage 2: full fine-tuning. Every weight trains; AdamW, mixed precision on CUDA, runs under `accelerate launch`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.cli import train_method  # noqa: E402

if __name__ == "__main__":
    train_method("full", __doc__)
