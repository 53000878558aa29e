"""Reading and writing the kit's files: atomic writes (a crash leaves either the previous complete state or the new
one), a full disk reported as one sentence, and damaged files named with what to do about them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from studykit.errors import UserError

# Directories being written carry this marker in their name until they are renamed into place.
PARTIAL_MARKER = ".partial-"
# A write that fails while less than this is free failed for want of space, whatever the writer called it (torch's
# zip writer reports a full disk as "unexpected pos 704 vs 598").
NEARLY_FULL_BYTES = 1 * 2**20
MIB = 2**20


class DamagedFile(UserError):
    """A file the kit wrote (or was given) that cannot be read back: cut short, overwritten, not what it should hold."""

    def __init__(self, path: Path, reason: str, remedy: str) -> None:
        self.path, self.reason, self.remedy = Path(path), reason, remedy
        super().__init__(f"{path} is damaged ({reason}); {remedy}.")

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.remedy)


class DiskFull(UserError):
    """A write that the disk had no room for; the atomic writers leave the previous complete version in place."""


def read_json(
    path: Path, remedy: str = "delete it and run the command that made it again", expect: Optional[type] = dict
) -> Any:
    """A JSON file the kit wrote, or a DamagedFile naming it and `remedy` (what the user should do). A missing file
    is the caller's business (FileNotFoundError)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text", remedy) from None
    except json.JSONDecodeError as error:
        raise DamagedFile(path, f"not valid JSON: {error.msg} at line {error.lineno}", remedy) from None
    except OSError as error:
        raise DamagedFile(path, error.strerror or type(error).__name__, remedy) from None
    if expect is not None and not isinstance(value, expect):
        raise DamagedFile(path, f"it holds {type(value).__name__} where {expect.__name__} was expected", remedy)
    return value


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the filesystem that holds `path` (or would hold it, if it does not exist yet)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def is_out_of_space(error: BaseException) -> bool:
    """Whether a write failed for want of space. Python and numpy raise OSError(ENOSPC); safetensors wraps it in its own
    error ("os error 28"); torch's writer gives no reason at all, so that case is decided by the free space left."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(
        marker in text for marker in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
    )


def _as_out_of_space(error: BaseException, where: Path) -> BaseException:
    """Called before a failed write's leftovers are removed, while the disk is still as full as the write left it."""
    if (
        not is_out_of_space(error)
        and isinstance(error, (OSError, RuntimeError))
        and free_bytes(where) < NEARLY_FULL_BYTES
    ):
        return OSError(errno.ENOSPC, f"No space left on device ({error})")
    return error


def format_size(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


@contextlib.contextmanager
def disk_space_for(target: Path, needed_bytes: int, what: str, then: str) -> Iterator[None]:
    """Writes of about `needed_bytes` under `target`: refused before they start when the disk lacks the room, and a
    write that runs out of room midway becomes one sentence (`then`: what the user does once space is freed). The
    atomic writers have already removed what was half-written, so the previous complete version is untouched."""
    target = Path(target)
    require_free_space(target, needed_bytes, what, then)
    try:
        yield
    except DiskFull:
        raise
    except Exception as error:
        if not is_out_of_space(error):
            raise
        raise DiskFull(_disk_full_message(target, what, needed_bytes, free_bytes(target), then)) from None


def require_free_space(target: Path, needed_bytes: int, what: str, then: str) -> None:
    """Refuse, before work whose result would not fit, when the disk lacks `needed_bytes` for it."""
    free = free_bytes(target)
    if free < needed_bytes:
        raise DiskFull(_disk_full_message(Path(target), what, needed_bytes, free, then))


def _disk_full_message(target: Path, what: str, needed_bytes: int, free: int, then: str) -> str:
    return (
        f"the disk holding {target} is full: writing {what} needs about {format_size(needed_bytes)} and "
        f"{format_size(free)} is free; {then}"
    )


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
    except BaseException as error:
        reported = _as_out_of_space(error, path.parent)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        if reported is not error:
            raise reported from error
        raise


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk, so a rename never points at data still in the page cache."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as temp_path:
        temp_path.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


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
    except BaseException as error:
        reported = _as_out_of_space(error, temp_path)
        shutil.rmtree(temp_path, ignore_errors=True)
        if reported is not error:
            raise reported from error
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


def refuse_foreign_directory(directory: Path, holds_own: bool, what: str) -> None:
    """A stage writes its result over `directory` only when it is empty or holds the stage's own `what` (a training
    run, a prepared dataset): a directory of someone else's files is refused, never written over."""
    others = visible_entries(directory)
    if others and not holds_own:
        raise UserError(
            f"{directory} is not empty and holds no {what} ({', '.join(others[:3])}); choose an empty or new "
            "--output-dir."
        )


def check_writable_location(path: Path, flag: str) -> None:
    """Fail before hours of work, without creating anything: the nearest existing ancestor must be a writable
    directory."""
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
