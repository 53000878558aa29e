"""Stage 3: LoRA. The base model is frozen; adapters on attention c_attn and attention c_proj train by default."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studykit.cli import train_method  # noqa: E402

if __name__ == "__main__":
    train_method("lora", __doc__)
