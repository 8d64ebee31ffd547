"""Files the connector writes that hold patient data or secrets: readable by their owner only (0600),
whatever the umask. `open(path, "w")` would give 0644 under the usual umask 022."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

PRIVATE = 0o600


def open_private(path: Path, mode: str = "w") -> IO[str]:
    """Open (creating if needed) a text file that only its owner may read and write; an existing file is
    narrowed to 0600 too. `mode` "w" truncates, "a" appends, "r+" neither."""
    flags = os.O_CREAT | {"w": os.O_WRONLY | os.O_TRUNC, "a": os.O_WRONLY | os.O_APPEND, "r+": os.O_RDWR}[mode]
    descriptor = os.open(path, flags, PRIVATE)
    try:
        os.fchmod(descriptor, PRIVATE)  # os.open's mode is filtered by the umask; fchmod is not
        return os.fdopen(descriptor, mode, encoding="utf-8")
    except BaseException:
        os.close(descriptor)
        raise


def write_private(path: Path, text: str) -> None:
    """Write a whole text file (a rendered email, a generated key) readable by its owner only."""
    with open_private(path, "w") as handle:
        handle.write(text)


def create_private(path: Path) -> bool:
    """Create an empty 0600 file if there is none (the SQLite ledger, before SQLite creates it with 0644:
    SQLite then gives its -wal and -shm files the same mode). True if it was created here; an existing
    file is left as it is, and a folder that is missing or not writable is left for the caller to report."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE)
    except OSError:
        return False
    try:
        os.fchmod(descriptor, PRIVATE)
    finally:
        os.close(descriptor)
    return True
