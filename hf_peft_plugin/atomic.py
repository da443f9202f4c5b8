"""Writing a folder of files as one unit: readers see all the old files or all the new ones.

A saved adapter is several files (config + weights, peft's pair and this package's extras) that
only make sense together. Renaming each file into place is atomic per file, not per adapter: a
kill between two renames, or a second process saving into the same folder, would leave one
save's config next to another's weights. So:

* **A lock per folder.** Writers hold an exclusive ``flock`` on the folder itself (no lock file to
  leave behind or upload); readers hold a shared one while they read. Advisory: it orders this
  package's writers and readers, and does nothing on systems without ``fcntl`` (Windows).
* **A journal as the commit point.** Every new file is written to a hidden temporary file in the
  folder and flushed to disk; then a journal naming them is written (atomically); then the
  temporary files are renamed into place and the journal is removed. A save killed before the
  journal exists left only temporary files: the old files are whole, and the next writer deletes
  the orphans. A save killed after it is finished by whoever takes the folder next (a save or a
  load), which renames the rest into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the journal still makes each save all or nothing
    fcntl = None

JOURNAL_NAME = ".hf_peft_plugin-save.json"
#: Hidden names this module creates: ``.<final name>.<8 hex>.tmp`` files and ``.<name>.<8 hex>.deleted`` folders.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.(tmp|deleted)$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the hidden temporary names of this module (never uploaded)."""
    return name == JOURNAL_NAME or _TEMP_NAME.match(name) is not None


def _temp_name(final: str, kind: str = "tmp") -> str:
    return f".{final}.{secrets.token_hex(4)}.{kind}"


def _fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folder_lock(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold a shared or exclusive advisory lock on ``directory`` (which must exist)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a folder we may list but not open: go on without the lock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write`` a temporary file next to ``path``, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(_temp_name(path.name))
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def finish_interrupted_write(directory: Path) -> bool:
    """Complete a write that was killed after its commit point, and delete the orphans of writes
    killed before it. Call it holding the exclusive lock. Returns whether anything was left over."""
    journal_path = directory / JOURNAL_NAME
    found = False
    if journal_path.is_file():
        found = True
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = None  # cannot happen (the journal is itself written atomically); treat as no commit
        if isinstance(journal, dict):
            _apply(directory, journal)
        journal_path.unlink(missing_ok=True)
        _fsync_directory(directory)
    for entry in directory.iterdir():
        if is_temporary(entry.name):
            found = True
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return found


def _apply(directory: Path, journal: Mapping) -> None:
    for final, tmp in dict(journal.get("replace", {})).items():
        if (directory / tmp).exists():
            os.replace(directory / tmp, directory / final)
    for name in journal.get("remove", []):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    _fsync_directory(directory)


def write_folder(directory: Path, files: Mapping[str, bytes], remove: Iterable[str] = ()) -> None:
    """Replace ``files`` (name -> content) in ``directory`` and delete ``remove``, as one unit.

    Call it holding the exclusive lock of ``directory``.
    """
    finish_interrupted_write(directory)
    staged: dict[str, str] = {}
    try:
        for name, data in files.items():
            staged[name] = _temp_name(name)
            _write_bytes(directory / staged[name], data)
        journal = {"replace": staged, "remove": [n for n in remove if n not in files and (directory / n).exists()]}
        text = json.dumps(journal, sort_keys=True)
        write_atomically(directory / JOURNAL_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except BaseException:
        for tmp in staged.values():
            (directory / tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    # Committed: from here on, an interruption is finished by the next writer or reader.
    _apply(directory, journal)  # ends with a directory fsync: the renames are durable before the journal goes
    (directory / JOURNAL_NAME).unlink()


def remove_folder(directory: Path) -> None:
    """Delete ``directory``: renamed away first (one atomic step), then removed. A kill in between
    leaves a hidden ``.deleted`` folder that the next write into the parent removes."""
    doomed = directory.with_name(_temp_name(directory.name, "deleted"))
    os.replace(directory, doomed)
    _fsync_directory(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def reading(directory: Path) -> Iterator[None]:
    """Hold the shared lock of ``directory`` while reading it; a write killed after its commit
    point is finished first, so the reader sees the new files (or, before it, the old ones)."""
    if (directory / JOURNAL_NAME).is_file():
        with folder_lock(directory, exclusive=True):
            with contextlib.suppress(OSError):  # a read-only folder: read what is there
                finish_interrupted_write(directory)
    with folder_lock(directory, exclusive=False):
        yield
