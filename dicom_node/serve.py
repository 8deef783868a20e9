"""``dicomnode serve``: receive, complete series, run workers, shut down cleanly.

Data flows one way: SCP -> spool/ledger -> completion -> worker processes
(inference, building, delivery).  Workers are separate processes so the GIL
never slows reception.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node import selection
from dicom_node.completion import CompletionMonitor
from dicom_node.config import Config
from dicom_node.intake import Intake
from dicom_node.scp import start_scp
from dicom_node.transport import GuardedServer
from storage.ledger import InstanceRecord, Ledger
from storage.spool import Spool

log = logging.getLogger(__name__)


def open_storage(cfg: Config) -> tuple[Spool, Ledger]:
    cfg.storage.dir.mkdir(parents=True, exist_ok=True)
    spool = Spool(cfg.spool_dir, cfg.storage.min_free_mb)
    ledger = Ledger(cfg.storage.ledger_url, background_checkpoints=True)  # serve() runs them
    return spool, ledger


def reconcile(spool: Spool, ledger: Ledger) -> int:
    """Index spooled files that have no ledger row (e.g. after a power loss)."""
    known = ledger.known_instance_paths()
    n = 0
    for rel in spool.iter_files():
        if rel in known:
            continue
        path = spool.path(rel)
        try:
            ds = dcmread(path, defer_size=4096)
            f = selection.facts(ds)
            ledger.record_instance(
                InstanceRecord(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_uid=str(ds.StudyInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    path=rel,
                    size_bytes=path.stat().st_size,
                    calling_aet="(recovered)",
                    modality=f["modality"] or None,
                    description=f["description"] or None,
                    attrs=f,
                )
            )
            n += 1
        except Exception as exc:
            log.error("spooled file %s could not be re-indexed: %s", rel, exc)
    return n


class WorkerPool:
    """Keeps ``worker.processes`` synthesis workers alive."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self._stopping = False

    def start(self) -> None:
        for i in range(self.cfg.worker.processes):
            self.procs.append(self._spawn(i))

    def _spawn(self, i: int) -> mp.process.BaseProcess:
        from dicom_node.worker import worker_main

        p = self.ctx.Process(target=worker_main, args=(self.cfg, i, logging.getLevelName(logging.getLogger().getEffectiveLevel())), name=f"worker-{i}", daemon=False)
        p.start()
        log.info("worker %d started (pid %d)", i, p.pid)
        return p

    def supervise(self) -> None:
        if self._stopping:
            return
        for i, p in enumerate(self.procs):
            if not p.is_alive():
                log.error("worker %d (pid %s) exited with %s; restarting", i, p.pid, p.exitcode)
                self.procs[i] = self._spawn(i)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        for p in self.procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker pid %s did not stop in time; killing it", p.pid)
                p.kill()
                p.join(5)


def release_dead_local_leases(ledger: Ledger) -> int:
    """Jobs held by workers of this host that no longer exist are resumed at once."""
    host = socket.gethostname()

    def alive(worker: str) -> bool:
        try:
            pid = int(worker.rsplit(":", 1)[1])
            os.kill(pid, 0)
            return True
        except (ValueError, IndexError, ProcessLookupError):
            return False
        except PermissionError:
            return True

    return ledger.release_leases(host, alive)


def stop_receiving(server: GuardedServer, grace: float) -> None:
    """Stop the SCP within *grace* + about 3 s, whatever peers do.

    New connections stop at once, and so do connections that have not yet
    sent their association request.  Established associations get *grace*
    seconds to finish; then they are aborted and every connection is cut (a
    peer stalled mid-PDU cannot hold us).
    """
    server.shutdown()
    server.close_connections(unassociated_only=True)

    def established() -> list[Any]:
        return [a for a in server.active_associations if a.is_established]

    deadline = time.monotonic() + grace
    while established() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = established()
    if left:
        log.warning("%d association(s) still open at shutdown; aborting them", len(left))
        for a in left:
            a.abort(block=False)  # the A-ABORT goes out unless the reactor is blocked on a stalled peer
        time.sleep(0.5)
    server.close_connections()
    deadline = time.monotonic() + 2.0
    while established() and time.monotonic() < deadline:  # let the reactors see it (and fire their events)
        time.sleep(0.05)


def serve(cfg: Config, stop_event: threading.Event | None = None) -> int:
    stop = stop_event or threading.Event()
    spool, ledger = open_storage(cfg)
    log.info("starting: %s", cfg.summary())
    log.info("ledger schema v%d at %s", ledger.schema_version, cfg.storage.dir)
    partial = spool.clean_incoming()
    if partial:
        log.info("removed %d partial file(s) of interrupted transfers (never acknowledged)", partial)
    recovered = reconcile(spool, ledger)
    if recovered:
        log.warning("re-indexed %d spooled instance(s) missing from the ledger", recovered)
    released = release_dead_local_leases(ledger)
    if released:
        log.info("resuming %d job(s) left mid-way by a previous run", released)

    intake = Intake(spool, ledger, cfg.node.max_inflated_mb << 20)
    server = start_scp(cfg, ledger, intake)
    monitor = CompletionMonitor(ledger, cfg)
    monitor.start()
    pool = WorkerPool(cfg)
    pool.start()
    host, port = server.server_address[:2]
    log.info("listening on %s:%d as %s", host, port, cfg.node.ae_title)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: no new associations; finishing transfers in flight", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    while not stop.wait(1.0):
        pool.supervise()
        try:
            ledger.checkpoint()
        except Exception as exc:  # e.g. busy; the next second tries again
            log.debug("ledger checkpoint skipped: %s", exc)

    stop_receiving(server, min(cfg.node.dimse_timeout, 30.0))
    monitor.stop()
    monitor.join(5)
    pool.stop()
    ledger.close()
    log.info("stopped")
    return 0
