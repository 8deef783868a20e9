"""The instance spool: received DICOM files, made durable before we say "success".

Layout under ``<storage.dir>/spool``::

    .incoming/                      temporary files being received (same file system)
    <StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
    .lock                           storing an instance holds it shared; retention removing files, exclusive

A file only ever appears under its final name complete and fsynced: the data
is fsynced, renamed atomically into place and the folder entry fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from storage.durable import fsync_dir

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: errno values that mean "we are out of resources", not "the data is bad"
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO})


_FADV_DONTNEED: int | None = getattr(os, "POSIX_FADV_DONTNEED", None) if hasattr(os, "posix_fadvise") else None

#: free space far enough above the floor to skip checking it for a second
_ROOMY = 1 << 30  # bytes


class SpoolFull(OSError):
    """The spool cannot take more data (disk full, below the free-space floor, unwritable)."""


class AlreadySpooled(FileExistsError):
    """Another file was stored under this SOP Instance UID meanwhile (see :meth:`Spool.commit`)."""


def _place_new(tmp: Path, final: Path) -> None:
    """Rename *tmp* to *final* unless *final* exists (then :class:`AlreadySpooled`), atomically: a hard link
    fails on an existing name, in this process or any other."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise AlreadySpooled(errno.EEXIST, "already spooled", str(final)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():  # a file system without hard links: checked, then renamed (not atomic)
            raise AlreadySpooled(errno.EEXIST, "already spooled", str(final)) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def valid_uid(uid: object) -> bool:
    """True for a DICOM UID that is safe to use as a path component."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    relpath: str
    size: int


class Spool:
    def __init__(self, root: Path, min_free_mb: int = 0, *, create: bool = True) -> None:
        """*create* False (a dry run that only reads): no folder is made."""
        self.root = root
        self.incoming = root / ".incoming"
        self.min_free_bytes = min_free_mb * 1024 * 1024
        if create:
            self.incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._roomy_until = 0.0  # monotonic time until which free space need not be checked again

    # ------------------------------------------------------------------ paths
    def relpath_for(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
            if not valid_uid(uid):
                raise ValueError(f"invalid {name} {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int = 0) -> None:
        if self.min_free_bytes <= 0:
            return
        now = time.monotonic()
        if now < self._roomy_until and incoming_bytes < _ROOMY:
            return
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFull(
                errno.ENOSPC,
                f"spool has {free // 2**20} MB free, below storage.min_free_mb={self.min_free_bytes // 2**20}",
            )
        # Far above the floor: skip the file-system query for a second (one per instance
        # otherwise); a second of receiving cannot use up the margin.
        self._roomy_until = now + 1.0 if free - self.min_free_bytes > 2 * _ROOMY else 0.0

    # ---------------------------------------------------------------- commit
    def start_writeback(self, tmp: Path) -> None:
        """Ask the kernel to start writing *tmp* to disk now, without waiting.

        Called as soon as an instance has arrived: the disk writes while its
        header is checked, and the fsync in :meth:`commit` has less left to
        wait for.  Only a hint (Linux starts writeback on POSIX_FADV_DONTNEED;
        pages still dirty or being written stay cached, pages already on disk
        leave the cache, so the worker may read those from disk again); errors
        are ignored and the fsync still guarantees durability.
        """
        if _FADV_DONTNEED is None:
            return
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, _FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def commit(self, tmp: Path, study_uid: str, series_uid: str, sop_uid: str, size: int | None = None, *,
               replace: bool = True) -> SpooledFile:
        """Make *tmp* durable under its final name (fsync, rename, fsync folder).

        *tmp* must be on the spool's file system (``self.incoming``); *size*,
        when the caller knows it, saves a stat.  A file already stored under
        the same SOP Instance UID is replaced atomically; with *replace* false
        it is kept and :class:`AlreadySpooled` raised instead (*tmp* stays),
        so that two senders of one UID cannot silently replace each other.
        Raises :class:`SpoolFull` for resource problems.
        """
        rel = self.relpath_for(study_uid, series_uid, sop_uid)
        final = self.root / rel
        try:
            if size is None:
                size = tmp.stat().st_size
            self.check_space(0)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = final.parent
            if folder not in self._known_dirs:
                new_dirs = [p for p in (folder.parent, folder) if not p.exists()]
                folder.mkdir(parents=True, exist_ok=True)
                for d in new_dirs:  # make the new folder entries durable too
                    fsync_dir(d.parent)
                self._known_dirs.add(folder)
            place = os.replace if replace else _place_new
            try:
                place(tmp, final)
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                # the series' folder was removed by retention since we made it: make it again
                self._known_dirs.discard(folder)
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
                fsync_dir(folder.parent.parent)
                place(tmp, final)
            fsync_dir(folder)
        except SpoolFull:
            raise
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                self._known_dirs.discard(final.parent)
                raise SpoolFull(exc.errno, f"cannot write spool: {exc.strerror} ({final.parent})") from exc
            raise
        return SpooledFile(final, rel, size)

    def write_bytes(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> SpooledFile:
        """Durably store *data* (used when a dataset arrives in memory)."""
        self.check_space(len(data))
        fd, name = _mkstemp(self.incoming)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            os.unlink(name)
            if exc.errno in RESOURCE_ERRNOS:
                raise SpoolFull(exc.errno, f"cannot write spool: {exc.strerror}") from exc
            raise
        return self.commit(Path(name), study_uid, series_uid, sop_uid)

    # ---------------------------------------------------------------- locking
    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        # one open file per holder: flock locks belong to the open file, so threads must not share one
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock (the kernel does so too if the process dies)

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Held while one instance is checked, spooled and recorded: retention removes nothing meanwhile."""
        return self._locked(fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by retention while it removes one series' files and their rows: no instance is stored meanwhile."""
        return self._locked(fcntl.LOCK_EX)

    def remove_series_files(self, relpaths: Iterator[str] | list[str] | tuple[str, ...]) -> list[str]:
        """Delete spooled files (and the series/study folders they leave empty), durably; returns those
        that were already gone."""
        gone: list[str] = []
        folders: set[Path] = set()
        for rel in relpaths:
            p = self.root / rel
            folders.add(p.parent)
            try:
                p.unlink()
            except FileNotFoundError:
                gone.append(rel)
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            self._known_dirs.discard(folder)
            for d in (folder, folder.parent):
                if d == self.root or not d.is_relative_to(self.root):
                    break
                try:
                    d.rmdir()
                except FileNotFoundError:  # an interrupted removal took it already: its study may still be left
                    continue
                except OSError:  # not empty (another series of the study)
                    if d.exists():
                        fsync_dir(d)
                    break
                fsync_dir(d.parent)
        return gone

    # ------------------------------------------------------------ maintenance
    def clean_incoming(self) -> int:
        """Remove partial files left by interrupted transfers; returns how many."""
        n = 0
        for p in self.incoming.iterdir():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    def iter_files(self) -> Iterator[str]:
        """Relative paths of every committed instance (for start-up reconciliation)."""
        with os.scandir(self.root) as studies:
            for study in studies:
                if study.name.startswith(".") or not study.is_dir():
                    continue
                with os.scandir(study.path) as series_it:
                    for series in series_it:
                        if not series.is_dir():
                            continue
                        with os.scandir(series.path) as files:
                            for f in files:
                                if f.name.endswith(".dcm"):
                                    yield f"{study.name}/{series.name}/{f.name}"


def _mkstemp(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=folder, suffix=".part")
