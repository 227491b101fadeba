"""The data folder: private to its owner, and held by one server process at a time.

It holds every profile, token and credential: it is made readable by its owner only (0700,
its files 0600), and a folder found more open is tightened when the store opens. Two servers
on one folder would hand out the same profile ids and sequence numbers: a lock file
(``pigeon.lock``, holding the server's pid) keeps the second one out.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO

from server.runtime.errors import StorageError

__all__ = ["FOLDER_MODE", "FILE_MODE", "open_folder"]

log = logging.getLogger("pigeon.store")

#: Modes of the data folder and of the files the store creates in it.
FOLDER_MODE = 0o700
FILE_MODE = 0o600
_FILES = ("data.mdb", "lock.mdb", "pigeon.lock")


def open_folder(path: Path) -> IO[str]:
    """Make the folder (or tighten it), take it for this process; the lock file, held open
    while the store is (closing it releases the lock)."""
    try:
        path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot open the data folder {str(path)!r}: {exc}") from exc
    _tighten(path)
    return _lock(path)


def _lock(path: Path) -> IO[str]:
    fd = os.open(path / "pigeon.lock", os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
    lock = open(fd, "a+")  # noqa: SIM115 - held while the store is open
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise StorageError(
            f"the data folder {str(path)!r} is in use by another Pigeon server (pid {holder})"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _tighten(folder: Path) -> None:
    """Make the folder and the store's files private to their owner, as a folder made by
    an older Pigeon (0755, files 0644) or by hand may not be."""
    for path, mode in [(folder, FOLDER_MODE), *((folder / name, FILE_MODE) for name in _FILES)]:
        try:
            if path.exists() and path.stat().st_mode & 0o077:  # group or others may read
                path.chmod(mode)
                log.info("permissions of %s set to %o", path, mode)
        except OSError as exc:  # not the owner, or a file system without modes
            log.warning("cannot make %s private to its owner (mode %o): %s", path, mode, exc)
