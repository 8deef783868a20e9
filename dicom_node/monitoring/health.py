"""``/healthz``: is this ``serve`` able to take and process series right now?

Each check answers ok or not with one line of detail; the node is healthy when
every check is ok.  Checks are cheap and bounded (one trivial ledger query,
one tiny file written and removed, a ``statvfs``, reading small report files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from dicom_node.monitoring.metrics import ProcessView, WorkerSlots, ready_reports

__all__ = ["Check", "Health", "HealthReport", "LedgerProbe"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def as_json(self) -> dict[str, object]:
        return {"status": "ok" if self.ok else "failing", "failing": self.failing,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks}}


class LedgerProbe(Protocol):
    def ping(self) -> None: ...


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig or exc)
    return text.splitlines()[0] if text else type(exc).__name__


class ReceivingProcesses(Protocol):
    """``serve``'s receiving processes as health sees them (:class:`dicom_node.receivers.Receivers`)."""

    configured: int

    def states(self) -> Sequence[ProcessView]: ...


class Health:
    """The checks, in the order they are reported: process, receivers, ledger, spool, disk, workers, model."""

    def __init__(self, *, ledger: LedgerProbe, spool_incoming: Path, storage_dir: Path, min_free_bytes: int,
                 directions: Sequence[str], configured_workers: int, pool: WorkerSlots | None,
                 stopping: threading.Event, receivers: ReceivingProcesses | None = None) -> None:
        self.ledger = ledger
        self.spool_incoming = spool_incoming
        self.storage_dir = storage_dir
        self.min_free_bytes = min_free_bytes
        self.directions = tuple(directions)
        self.configured_workers = configured_workers
        self.pool = pool
        self.stopping = stopping
        self.receivers = receivers
        self.started = time.monotonic()

    def report(self) -> HealthReport:
        workers, model = self._workers_and_model()
        return HealthReport((self._process(), self._receivers(), self._ledger(), self._spool(), self._disk(), workers,
                             model))

    def _process(self) -> Check:
        if self.stopping.is_set():
            return Check("process", False, f"pid {os.getpid()} is stopping")
        return Check("process", True, f"pid {os.getpid()}, up {time.monotonic() - self.started:.0f} s")

    def _receivers(self) -> Check:
        if self.receivers is None:
            return Check("receivers", True, "1/1 listening (this process)")
        states = self.receivers.states()
        down = [f"receiver {r.index} (pid {r.pid}) is not running" for r in states if not r.alive]
        missing = self.receivers.configured - len(states)
        if missing > 0:
            down.append(f"{missing} receiver(s) not started")
        if down:
            return Check("receivers", False, "; ".join(down))
        return Check("receivers", True, f"{len(states)}/{self.receivers.configured} listening (node.receivers)")

    def _ledger(self) -> Check:
        t0 = time.monotonic()
        try:
            self.ledger.ping()
        except Exception as exc:
            return Check("ledger", False, f"cannot be read: {_one_line(exc)}")
        return Check("ledger", True, f"read in {1000 * (time.monotonic() - t0):.0f} ms")

    def _spool(self) -> Check:
        """A byte written, flushed and removed where received instances land."""
        try:
            fd, name = tempfile.mkstemp(dir=self.spool_incoming, prefix="health-", suffix=".probe")
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            return Check("spool", False, f"{self.spool_incoming} is not writable: {exc.strerror or exc}")
        return Check("spool", True, f"{self.spool_incoming} is writable")

    def _disk(self) -> Check:
        try:
            free = shutil.disk_usage(self.spool_incoming).free
        except OSError as exc:
            return Check("disk", False, f"free space unknown: {exc.strerror or exc}")
        mb, floor = free // 2**20, self.min_free_bytes // 2**20
        if free < max(self.min_free_bytes, 1):
            return Check("disk", False, f"{mb} MB free, below storage.min_free_mb = {floor}: instances are refused")
        return Check("disk", True, f"{mb} MB free (floor storage.min_free_mb = {floor})")

    def _workers_and_model(self) -> tuple[Check, Check]:
        if self.configured_workers == 0 or self.pool is None:
            none = "worker.processes = 0 (jobs run in `dicomnode worker` elsewhere)"
            return Check("workers", True, none), Check("model", True, none)
        slots = list(self.pool.slots())
        reports = ready_reports(self.storage_dir, self.pool)
        problems: list[str] = []
        for s in slots:
            if not s.alive:
                problems.append(f"worker {s.index} (pid {s.pid}) is not running")
            elif s.index not in reports:
                after = (f", restarted {s.seconds_since_restart:.0f} s ago after exit code {s.last_exit_code}"
                         if s.seconds_since_restart is not None else "")
                problems.append(f"worker {s.index} (pid {s.pid}) is starting (models not loaded yet){after}")
        missing = self.configured_workers - len(slots)
        if missing > 0:
            problems.append(f"{missing} worker(s) not started")
        workers = (Check("workers", False, "; ".join(problems)) if problems
                   else Check("workers", True, f"{len(reports)}/{self.configured_workers} running and ready"))
        if not reports:
            return workers, Check("model", False, "no worker has loaded the models yet")
        errors = sorted({f"{d}: {e}" for r in reports.values() for d, e in r.errors.items()})
        lacking = sorted({d for r in reports.values() for d in self.directions if d not in r.models and d not in r.errors})
        if errors or lacking:
            return workers, Check("model", False, "; ".join(errors + [f"{d}: not loaded" for d in lacking]))
        loaded = sorted({f"{d}: {m.identity}" for r in reports.values() for d, m in r.models.items()})
        return workers, Check("model", True, ", ".join(loaded))
