"""What the dependencies may print: at the kit's entry points their log messages below ERROR and their Python warnings
stay off the terminal, so a command's stderr is the kit's own (a refused command prints its one `error:` line, whatever
versions are installed), unless `--verbose` or STUDYKIT_VERBOSE=1 asks for them.

Why: transformers 5.25 pulls in `kernels`, which logs a line about the Hub's offline mode whenever bitsandbytes loads
(peft imports it) ahead of the kit's own output; such lines come and go with every release."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Sequence

VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = (
    "show the dependencies' log messages and warnings (transformers, datasets, huggingface_hub, kernels, accelerate, "
    "peft, bitsandbytes), which are otherwise quiet below errors; the same as STUDYKIT_VERBOSE=1"
)
# Set by --verbose too, so the processes a study starts (each training) are as verbose as it is.
VERBOSE_ENVIRONMENT = "STUDYKIT_VERBOSE"
# Set when quieted, so the processes this one starts without an entry point (a study's trainings, forked from a server
# that imports the trainer, and so bitsandbytes and kernels, first) quiet themselves on importing studykit.
QUIET_ENVIRONMENT = "STUDYKIT_QUIET_DEPENDENCIES"
# The libraries whose loggers and warnings are kept quiet.
LIBRARIES = ("transformers", "datasets", "huggingface_hub", "kernels", "accelerate", "peft", "bitsandbytes")
# transformers, datasets and huggingface_hub set their loggers' level from these when they are imported (a level set
# earlier is overwritten), and the processes this one starts inherit them; a user's own setting is kept.
LIBRARY_VERBOSITY_VARIABLES = {
    "TRANSFORMERS_VERBOSITY": "transformers.utils.logging",
    "DATASETS_VERBOSITY": "datasets.utils.logging",
    "HF_HUB_VERBOSITY": "huggingface_hub.utils.logging",
}


def verbose_requested(argv: Sequence[str]) -> bool:
    return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENVIRONMENT, "") not in ("", "0")


def quiet_dependencies(argv: Sequence[str]) -> None:
    """Call first thing in an entry point, with its command-line arguments (before the libraries are imported)."""
    if verbose_requested(argv):
        os.environ[VERBOSE_ENVIRONMENT] = "1"
        return
    os.environ[QUIET_ENVIRONMENT] = "1"
    for library in LIBRARIES:
        logging.getLogger(library).setLevel(logging.ERROR)
        # Warnings raised inside the library (those it attributes to the kit's own calls still show: they are ours).
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    for variable, module in LIBRARY_VERBOSITY_VARIABLES.items():
        if os.environ.setdefault(variable, "error") == "error" and module in sys.modules:
            # Already imported (a script that imported the kit's modules first): its level was set at import.
            sys.modules[module].set_verbosity_error()
