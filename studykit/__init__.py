"""Shared pieces of the LoRA-vs-full-fine-tuning study: config, data, modeling, training, metrics, reporting."""

import logging
import os

from studykit.dependency_logs import QUIET_ENVIRONMENT, quiet_dependencies

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed (for --optimizer adamw8bit), and on a CPU with AVX-512 that
# warns of a missing 4-bit matmul kernel the kit never uses: a stray line on stderr before every LoRA run's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# A process started by a quieted command (a study's trainings): as quiet as its parent (studykit/dependency_logs.py).
if os.environ.get(QUIET_ENVIRONMENT) == "1":
    quiet_dependencies(())
