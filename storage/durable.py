"""Durable files: a file only ever appears under its final name complete and on disk.

Write to a temporary file in the same folder, fsync it, rename it into place
atomically, then fsync the folder so the new entry survives a power loss.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["fsync_dir", "write_durably"]


def fsync_dir(path: Path) -> None:
    """Make *path*'s entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, write: Callable[[BinaryIO], object], *, sync_folder: bool = True) -> Path:
    """Write *final* through ``write(file)``: temporary file beside it, fsync, atomic rename.

    With *sync_folder* the folder is fsynced too; a caller writing many files
    into one folder passes False and calls :func:`fsync_dir` once at the end.
    Nothing is left behind when *write* fails.
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=final.suffix, dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        fsync_dir(final.parent)
    return final
