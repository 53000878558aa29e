"""Errors a user can cause: reported as one sentence and a non-zero exit, never as a stack trace."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the input or environment that the user can fix; the message says how."""


def first_line(error: BaseException) -> str:
    """An exception's first line, for a one-sentence error that names its cause."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


EXIT_USER_ERROR = 2
# The shell's convention for a process ended by SIGINT: 128 + 2.
EXIT_INTERRUPTED = 130


def report_user_errors(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a script's main so a UserError prints `error: <sentence>` and exits 2; internal bugs still raise."""

    @functools.wraps(main)
    def wrapped() -> None:
        try:
            main()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(getattr(error, "exit_code", EXIT_USER_ERROR))
        except OSError as error:
            # The saves that matter say which disk and how much they need (io.disk_space_for); this catches the rest.
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(
                f"error: the disk is full ({error}); free some space and run the same command again (files being "
                "written were discarded, finished ones kept).",
                file=sys.stderr,
            )
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            # Ctrl-C outside the training loop (or a second one inside it). Writes are atomic: what was being
            # written is discarded, what was already in place stays.
            print(
                "error: interrupted; files being written were discarded, finished ones kept; run the command again.",
                file=sys.stderr,
            )
            sys.exit(EXIT_INTERRUPTED)

    return wrapped
