"""The files pynetdicom streams received data sets into, made safe for a full disk.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming data set
to a temporary file from its reactor thread, P-DATA by P-DATA.  On a full disk
that write raises, the exception ends the association (an abort, no C-STORE
response) and the partial file stays behind.  :class:`IncomingFile` takes its
place: a failed write frees what the file held at once (truncates it),
swallows the rest of the data set, and remembers the error, so that the C-STORE
handler can answer 0xA700 (out of resources) on an association that carries
on; a file abandoned by an aborted association is removed when pynetdicom
drops it.

pynetdicom has no hook for the temporary file, so :func:`install` replaces the
factory its DIMSE decoder calls (``pynetdicom.dimse_messages.NamedTemporaryFile``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_errors: dict[str, OSError] = {}  # path -> the write error, until the handler asks


def _discard(path: str) -> None:
    """Finalizer: the file object is gone; a file nobody took over (an aborted transfer) is removed."""
    with _lock:
        _errors.pop(path, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - e.g. the folder vanished
        log.debug("could not remove %s: %s", path, exc)


class IncomingFile:
    """A write-only temporary file in *folder* whose write errors are kept, not raised."""

    def __init__(self, folder: Path, suffix: str = ".dcm") -> None:
        fd, self.name = tempfile.mkstemp(dir=folder, prefix="rcv-", suffix=suffix)
        self._fh = os.fdopen(fd, "wb")
        self.error: OSError | None = None
        self._finalizer = weakref.finalize(self, _discard, self.name)

    @property
    def file(self) -> "IncomingFile":  # pynetdicom calls ``.file.flush()``
        return self

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            with _lock:
                _errors[self.name] = exc
            try:  # give the space back now, not when the data set has been read to its end
                os.ftruncate(self._fh.fileno(), 0)
            except OSError:
                pass
            log.warning("receiving into %s failed: %s; the rest of the data set is discarded",
                        os.path.basename(self.name), exc.strerror or exc)

    def write(self, data: Any) -> int:
        n = len(data)
        if self.error is None:
            try:
                self._fh.write(data)
            except OSError as exc:
                self._failed(exc)
        return n

    def flush(self) -> None:
        if self.error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError as exc:
            self._failed(exc)
            try:
                self._fh.close()
            except OSError:
                pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def write_error(path: Path | str) -> OSError | None:
    """The error that struck while *path* was being received (None: it was received whole)."""
    with _lock:
        return _errors.get(str(path))


def install(folder: Path) -> None:
    """Make pynetdicom receive data sets into :class:`IncomingFile` objects in *folder*."""
    from pynetdicom import dimse_messages

    def factory(*_args: Any, suffix: str = ".dcm", **_kwargs: Any) -> IncomingFile:
        return IncomingFile(folder, suffix=suffix)

    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment,attr-defined]
