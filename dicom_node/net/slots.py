"""Association slots shared by every receiving process of one ``serve`` (``node.max_associations`` across all).

A slot is a file in a folder private to that ``serve``; an admitted association holds an exclusive
``flock`` on one of them for as long as it lives.  ``flock`` locks belong to an open file description, so
two threads of one process exclude each other exactly as two processes do, and the kernel releases the
lock when its process dies (``kill -9`` included): a crashed receiver never keeps a slot.

The folder must be on a local file system (NFS turns ``flock`` into POSIX locks, which are per process):
``serve`` makes it with :func:`tempfile.mkdtemp`.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
from pathlib import Path

__all__ = ["AssociationSlots", "Slot"]


class Slot:
    """One held slot; :meth:`release` (or the end of the process) frees it."""

    def __init__(self, fd: int, index: int) -> None:
        self._fd: int | None = fd
        self.index = index

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file drops its flock


class AssociationSlots:
    """At most *limit* slots held at a time by every process that opens *folder* with the same *limit*."""

    def __init__(self, folder: Path, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.folder = folder
        self.limit = limit
        folder.mkdir(parents=True, exist_ok=True)
        self._paths = [folder / f"association-{i}.lock" for i in range(limit)]
        for p in self._paths:
            p.touch(exist_ok=True)
        self._next = itertools.count()  # where the next search starts: spreads the probes over the files
        self._lock = threading.Lock()

    def acquire(self) -> Slot | None:
        """A free slot, or None when all *limit* are held (by any process)."""
        with self._lock:
            start = next(self._next) % self.limit
        for k in range(self.limit):
            i = (start + k) % self.limit
            fd = os.open(self._paths[i], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return Slot(fd, i)
        return None
