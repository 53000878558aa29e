"""One process at a time writes a stage's output directory: a second one started on it is refused at once.

The lock is an OS lock (flock) on a hidden file, through `filelock`, so a process that dies, even by `kill -9`,
releases it: the next command takes it over without anyone deleting anything. Beside it, the holder writes who it
is (process id, host, command, start time), which is what the refusal names; that note exists only while the lock
is held, so one found by a process that got the lock is the trace of a holder that died, and is reported as such.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from studykit.errors import UserError

LOCK_FILE = ".studykit.lock"
OWNER_SUFFIX = ".owner"


class OutputInUse(UserError):
    """Another process holds the lock on the directory this command would write."""


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _read_owner(owner_path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(owner_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not yet said which)"
    host = "" if owner.get("host") == socket.gethostname() else f" on {owner.get('host')}"
    return f"process {owner.get('pid')}{host} (`{owner.get('command')}`, started {owner.get('started')})"


def _created_directories(directory: Path) -> list[Path]:
    """The directories a mkdir -p of `directory` would create, innermost first."""
    created = []
    while not directory.exists():
        created.append(directory)
        directory = directory.parent
    return created


@contextlib.contextmanager
def exclusive(directory: Path, flag: str, enabled: bool = True) -> Iterator[None]:
    """Hold the lock on `directory` (the directory a command writes, named by its `flag`) while the block runs.

    The lock file lies inside the directory. A prepared dataset replaces its directory in one rename at the very end;
    the lock on the old one lasts until then, and the new one is complete before anyone can lock it.
    A command leaves no trace of its lock: the lock file, and any directory made to hold it that is still empty, are
    removed when it ends, if this command created them. `enabled=False` (the other processes of an `accelerate
    launch`, whose main process holds the lock) does nothing."""
    if not enabled:
        yield
        return
    directory = Path(directory)
    lock_path = directory / LOCK_FILE
    owner_path = lock_path.with_name(lock_path.name + OWNER_SUFFIX)
    made_directories = _created_directories(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock, made_lock_file = _acquire(lock_path)
    if lock is None:
        _remove_empty(made_directories)
        raise OutputInUse(
            f"{_describe(_read_owner(owner_path))} is writing to {directory}; wait for it to finish or stop it, "
            f"or pass another {flag}."
        )
    try:
        left_behind = _read_owner(owner_path)
        if left_behind:
            print(
                f"note: taking over the lock on {directory} from {_describe(left_behind)}, which ended without "
                "releasing it."
            )
        owner_path.write_text(json.dumps(_owner_record()) + "\n", encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            owner_path.unlink()
        if made_lock_file:
            # Unlinked before the release, so no process can lock this file after us and believe it holds the lock.
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        lock.release()
        _remove_empty(made_directories)


def _acquire(lock_path: Path):
    """(the held lock, whether this process created its file), or (None, False) when another process holds it."""
    from filelock import FileLock, Timeout

    while True:
        made_lock_file = not lock_path.exists()
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return None, False
        # The holder before us may have removed the file between our opening and locking it: a lock on a file that
        # is no longer there excludes nobody, so take the lock again on the file that is.
        if lock_path.exists():
            return lock, made_lock_file
        lock.release()


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):  # not empty: the command wrote something there before it ended
            directory.rmdir()
