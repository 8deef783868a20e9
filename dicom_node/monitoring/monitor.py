"""What ``serve`` builds for monitoring: the registry, the receive counters, the health checks, the listener."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from dicom_node.config import Config
from dicom_node.monitoring.health import Health, ReceivingProcesses
from dicom_node.monitoring.metrics import LedgerCollector, LocalCollector, WorkerSlots, build_registry
from storage.db import LedgerError
from storage.ledger import Ledger

if TYPE_CHECKING:
    from dicom_node.web.listener import HttpListener

__all__ = ["Monitor"]

log = logging.getLogger(__name__)


class Monitor:
    """Metrics and health of one ``serve``; :meth:`start_http` serves them when ``[http] enabled``.

    Reads the ledger through a read-only connection of its own (a scrape never
    takes the write lock nor waits for a writer); *ledger*, the writer's, only
    where no second connection can see it (an in-memory SQLite ledger).
    """

    def __init__(self, cfg: Config, pool: WorkerSlots | None, ledger: Ledger | None = None, *,
                 receivers: ReceivingProcesses | None = None) -> None:
        self.cfg = cfg
        self.stopping = threading.Event()
        try:
            self.ledger = Ledger(cfg.storage.ledger_url, read_only=True)
            self._own_ledger = True
        except LedgerError:  # e.g. an in-memory SQLite ledger: only the writer's connection can see it
            if ledger is None:
                raise
            self.ledger, self._own_ledger = ledger, False
        min_free = cfg.storage.min_free_mb * 2**20
        local = LocalCollector(cfg.storage.dir, cfg.spool_dir, cfg.output_dir, min_free, cfg.worker.processes, pool)
        self.registry, self.counters = build_registry([LedgerCollector(self.ledger), local])
        self.health = Health(ledger=self.ledger, spool_incoming=cfg.spool_dir / ".incoming",
                             storage_dir=cfg.storage.dir, min_free_bytes=min_free,
                             directions=[d.value for d in cfg.model.directions],
                             configured_workers=cfg.worker.processes, pool=pool, stopping=self.stopping,
                             receivers=receivers)
        self._http: HttpListener | None = None

    def start_http(self) -> tuple[str, int]:
        """Serve ``/metrics`` and ``/healthz``; returns where (raises ListenError if it cannot listen)."""
        from dicom_node.web.app import NodeApp
        from dicom_node.web.listener import HttpListener

        self._http = HttpListener(NodeApp(self.registry, self.health), self.cfg.http.host, self.cfg.http.port).start()
        return self._http.host, self._http.port

    def close(self) -> None:
        self.stopping.set()
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._own_ledger:
            self.ledger.close()

