"""Shared pieces of the LoRA-vs-full-fine-tuning study: config, data, modeling, training, metrics, reporting."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed (for --optimizer adamw8bit), and on a CPU with AVX-512 that
# warns of a missing 4-bit matmul kernel the kit never uses: a stray line on stderr before every LoRA run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
