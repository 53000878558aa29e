"""Atomic file and directory writes: a crash leaves either the previous complete state or the new one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from studykit.errors import UserError

# Directories being written carry this marker in their name until they are renamed into place.
PARTIAL_MARKER = ".partial-"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """For writers that want a path (np.savez, torch.save): they write a temporary sibling, renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}{PARTIAL_MARKER}{os.getpid()}{''.join(path.suffixes)}")
    try:
        yield temp_path
        _fsync(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk, so a rename never points at data still in the page cache."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


@contextlib.contextmanager
def atomic_directory(final_path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final_path` in one rename."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = final_path.parent / f"{final_path.name}{PARTIAL_MARKER}{os.getpid()}"
    if temp_path.exists():
        shutil.rmtree(temp_path)
    temp_path.mkdir()
    try:
        yield temp_path
        for written in [*temp_path.rglob("*"), temp_path]:
            _fsync(written)
    except BaseException:
        shutil.rmtree(temp_path, ignore_errors=True)
        raise
    old_path = None
    if final_path.exists():
        old_path = final_path.parent / f"{final_path.name}{PARTIAL_MARKER}old-{os.getpid()}"
        os.replace(final_path, old_path)
    os.replace(temp_path, final_path)
    _fsync(final_path.parent)
    if old_path is not None:
        shutil.rmtree(old_path, ignore_errors=True)


def find_partial_directories(parent: Path) -> list[Path]:
    """Leftovers of a write that crashed before its rename: reported, never loaded."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if PARTIAL_MARKER in p.name)


def visible_entries(directory: Path) -> list[str]:
    """Names in a directory that make it someone's: hidden files (.DS_Store, .gitkeep) and leftovers of crashed
    writes do not. Empty for a directory that does not exist."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".") and PARTIAL_MARKER not in p.name)


def check_writable_location(path: Path, flag: str) -> None:
    """Fail before hours of work, without creating anything: the nearest existing ancestor must be a writable directory."""
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        reason = "is a file, not a directory" if not ancestor.is_dir() else "is not writable"
        raise UserError(f"cannot write to {path}: {ancestor} {reason}; choose another directory with {flag}.")


def ensure_writable_directory(path: Path, flag: str) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write to {path} ({error.strerror}); choose another directory with {flag}.") from None
    return path
