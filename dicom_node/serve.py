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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from dicom_node import selection
from dicom_node.completion import CompletionMonitor
from dicom_node.config import Config
from dicom_node.intake import Intake
from dicom_node.monitoring.monitor import Monitor
from dicom_node.prune import Pruner, RetentionThread
from dicom_node.net.scp import LedgerCarriers, start_scp, stop_receiving
from dicom_node.receivers import Receivers
from storage.ledger import InstanceRecord, Ledger, worker_name
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
            ledger.record_instance(InstanceRecord.of(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=rel, size_bytes=path.stat().st_size,
                calling_aet="(recovered)", facts=selection.facts(ds)))
            n += 1
        except Exception as exc:
            log.error("spooled file %s could not be re-indexed: %s", rel, exc)
    return n


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    pid: int | None
    alive: bool
    last_exit_code: int | None = None  # of the worker this one replaced, if any
    seconds_since_restart: float | None = None


class WorkerPool:
    """Keeps ``worker.processes`` synthesis workers alive.

    Workers end by themselves when ``serve`` dies (see
    :func:`dicom_node.children.watch_parent`); a worker that dies is reaped, its
    job handed back at once (``on_death`` gets its ledger name) and it is
    restarted.
    """

    def __init__(self, cfg: Config, on_death: Callable[[str], object] | None = None) -> None:
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self._stopping = False
        self._on_death = on_death
        self.restarts = 0  # workers that died and were started again
        self._last_exit: dict[int, tuple[int | None, float]] = {}  # slot -> (exit code, monotonic time) of the last death

    def start(self) -> None:
        for i in range(self.cfg.worker.processes):
            self.procs.append(self._spawn(i))

    def _spawn(self, i: int) -> mp.process.BaseProcess:
        from dicom_node.worker import worker_main

        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        p = self.ctx.Process(target=worker_main, args=(self.cfg, i, level, os.getpid()), name=f"worker-{i}",
                             daemon=False)
        p.start()
        log.info("worker %d started (pid %d)", i, p.pid)
        return p

    def supervise(self) -> None:
        if self._stopping:
            return
        for i, p in enumerate(self.procs):
            if not p.is_alive():  # also reaps it (no zombie left behind)
                log.error("worker %d (pid %s) exited with %s; resuming its job and restarting it", i, p.pid,
                          p.exitcode)
                if self._on_death is not None:
                    try:
                        self._on_death(worker_name(socket.gethostname(), p.pid or 0))
                    except Exception:
                        log.exception("could not hand back the job of worker pid %s", p.pid)
                self._last_exit[i] = (p.exitcode, time.monotonic())
                self.restarts += 1
                self.procs[i] = self._spawn(i)

    def slots(self) -> list[WorkerSlot]:
        """Each configured worker: its PID, whether it runs, and how its predecessor ended (for /healthz)."""
        out = []
        for i, p in enumerate(list(self.procs)):
            code, at = self._last_exit.get(i, (None, None))
            # not p.is_alive(): that reaps, and reaping belongs to supervise() on the main thread
            alive = p.pid is not None and pid_alive(p.pid)
            out.append(WorkerSlot(i, p.pid, alive, code, None if at is None else time.monotonic() - at))
        return out

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


def pid_alive(pid: int) -> bool:
    """True if process *pid* exists and is not a zombie (a dead process not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (or it just exited): os.kill said it exists
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state not in (["Z"], ["X"])


def release_dead_local_leases(ledger: Ledger) -> int:
    """Jobs held by workers of this host that no longer exist (or are zombies) are resumed at once."""
    host = socket.gethostname()

    def alive(worker: str) -> bool:
        try:
            return pid_alive(int(worker.rsplit(":", 1)[1]))
        except (ValueError, IndexError):
            return False

    return ledger.release_leases(host, alive)


def check_listen_address(host: str, port: int) -> None:
    """Raise OSError (e.g. address in use) before anything is created on disk, if we could not listen there."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SCP's own socket: TIME_WAIT is no obstacle
        s.bind((host, port))
        s.listen(1)


def serve(cfg: Config, stop_event: threading.Event | None = None) -> int:
    stop = stop_event or threading.Event()
    check_listen_address(cfg.node.host, cfg.node.port)  # a port in use must not leave a new ledger behind
    if cfg.http.enabled:
        from dicom_node.web.listener import check_http_address

        check_http_address(cfg.http.host, cfg.http.port)  # ListenError: one line naming http.host:http.port
    spool, ledger = open_storage(cfg)
    log.info("starting: %s", cfg.summary())
    log.info("ledger schema v%d at %s", ledger.schema_version, cfg.storage.dir)
    partial = spool.clean_incoming()
    if partial:
        log.info("removed %d partial file(s) of interrupted transfers (never acknowledged)", partial)
    pruner = Pruner(cfg.retention, ledger, spool, cfg.output_dir, cfg.storage.dir)
    pruner.finish_interrupted()  # a prune cut short (a crash, a kill) is finished before anything else
    recovered = reconcile(spool, ledger)
    if recovered:
        log.warning("re-indexed %d spooled instance(s) missing from the ledger", recovered)
    released = release_dead_local_leases(ledger)
    if released:
        log.info("resuming %d job(s) left mid-way by a previous run", released)

    intake = Intake(spool, ledger, overwrite_instances=cfg.storage.overwrite_instances,
                    max_inflated=cfg.node.max_inflated_mb << 20)
    pool = WorkerPool(cfg, on_death=ledger.release_own)
    receivers = Receivers(cfg)
    watch = Monitor(cfg, pool, ledger, receivers=receivers)  # metrics and health; the SCP counts into it
    carriers = LedgerCarriers(ledger, cfg.series.complete_on_release)
    server = start_scp(cfg, ledger, intake, observer=watch.counters, carriers=carriers, slots=receivers.slots,
                       receivers=cfg.node.receivers)
    assert server.socket is not None
    receivers.start(server.socket, watch.counters, carriers)
    monitor = CompletionMonitor(ledger, cfg)
    monitor.start()
    pool.start()
    retention = RetentionThread(pruner, cfg.retention.interval_minutes * 60)
    if cfg.retention.interval_minutes > 0:
        retention.start()
    host, port = server.server_address[:2]
    log.info("listening on %s:%d as %s", host, port, cfg.node.ae_title)
    if cfg.http.enabled:
        try:
            http_host, http_port = watch.start_http()
        except OSError:  # taken since the check at start: stop what runs, then say so in one line
            receivers.terminate()
            stop_receiving(server, 0)
            receivers.join(10)
            monitor.stop()
            pool.stop()
            watch.close()
            retention.stop()
            ledger.close()
            receivers.close()
            raise
        log.info("http on %s:%d: /metrics, /healthz", http_host, http_port)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: no new associations; finishing transfers in flight", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    ticks = 0
    while not stop.wait(1.0):
        pool.supervise()
        receivers.supervise()
        ticks += 1
        if ticks % 5 == 0:  # e.g. a worker of an earlier run that exited since, or a local `dicomnode worker`
            try:
                n = release_dead_local_leases(ledger)
                if n:
                    log.info("resuming %d job(s) of worker(s) that died", n)
            except Exception as exc:
                log.debug("dead-lease check skipped: %s", exc)
        try:
            ledger.checkpoint()
        except Exception as exc:  # e.g. busy; the next second tries again
            log.debug("ledger checkpoint skipped: %s", exc)

    watch.stopping.set()  # /healthz answers 503 "stopping" while the rest shuts down
    grace = min(cfg.node.dimse_timeout, 30.0)
    receivers.terminate()  # they finish their transfers in flight while this process finishes its own
    stop_receiving(server, grace)
    receivers.join(grace + 10)
    monitor.stop()
    monitor.join(5)
    pool.stop()
    watch.close()
    retention.stop()
    if retention.is_alive():
        retention.join(10)  # a removal cut short here is finished at the next start
    ledger.close()
    receivers.close()
    log.info("stopped")
    return 0
