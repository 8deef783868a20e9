"""``/metrics``: one registry of this ``serve`` (never prometheus-client's process-global one).

Three sources:

* :class:`ReceiveCounters`: in-process counters of what only this process's
  SCP sees (associations accepted and rejected, instances received);
* :class:`LedgerCollector`: facts that live in the ledger, read at scrape time
  (at most every 5 s, and at most 5 % of the time), so the work of every process sharing the
  ledger counts: series and jobs by state, rejected instances, deliveries,
  stage durations of finished job runs;
* :class:`LocalCollector`: this machine: free disk, spool and output bytes,
  the worker processes of this ``serve`` and the models they loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily,
                                    Metric)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.monitoring.readiness import ReadyReport, read_ready, ready_path
from storage.ledger import LedgerTallies

__all__ = ["LEDGER_CACHE_SECONDS", "STAGES", "STAGE_BUCKETS", "LedgerCollector", "LocalCollector", "ProcessView",
           "ReceiveCounters", "WorkerSlots", "build_registry", "ready_reports"]

log = logging.getLogger(__name__)

#: the worker's stage timings (see :class:`dicom_node.worker.Worker`)
STAGES: tuple[str, ...] = ("waiting", "loading", "inference", "qc", "building", "sending")
#: seconds; from a claimed-at-once job to an hour of retried sending
STAGE_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: ledger tallies are read again after this many seconds, or 20 times as long as the last reading took, if that is
#: longer (a long history is read less often: at most 5 % of the time); a scrape in between gets the last reading
LEDGER_CACHE_SECONDS = 5.0
LEDGER_COST_FACTOR = 20.0
#: the spool and output trees are walked again after this many seconds, or 20 times as long as the last walk
#: took, if that is longer (a big spool on a slow file system is walked less often: at most 5 % of the time)
DU_MIN_SECONDS = 1.0
DU_COST_FACTOR = 20.0


class ReceiveCounters:
    """What this process's SCP counts (a :class:`dicom_node.net.scp.ReceiveObserver`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter("dicomnode_associations_accepted", "Associations accepted by this serve's SCP",
                                registry=registry)
        self.rejected = Counter("dicomnode_associations_rejected", "Associations rejected by this serve's SCP",
                                ["reason"], registry=registry)
        for reason in ("calling_aet_not_allowed", "called_aet_not_ours", "association_limit", "other"):
            self.rejected.labels(reason)
        self.instances = Counter("dicomnode_instances_received", "C-STORE requests answered by this serve's SCP",
                                 ["outcome"], registry=registry)
        for outcome in ("stored", "duplicate", "rejected"):
            self.instances.labels(outcome)
        self.bytes = Counter("dicomnode_received_bytes", "Bytes of instances stored by this serve's SCP",
                             registry=registry)

    def association_accepted(self) -> None:
        self.accepted.inc()

    def association_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def instance_received(self, outcome: str, nbytes: int) -> None:
        self.instances.labels(outcome).inc()
        if outcome == "stored":
            self.bytes.inc(nbytes)


class TallySource(Protocol):
    def tallies(self, stages: Sequence[str], bounds: Sequence[float]) -> LedgerTallies: ...


class LedgerCollector(Collector):
    """Facts of the whole node, from the ledger (read-only; cached for *cache_seconds*)."""

    def __init__(self, ledger: TallySource, cache_seconds: float = LEDGER_CACHE_SECONDS) -> None:
        self.ledger = ledger
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()  # one query at a time; concurrent scrapes share its result
        self._cached: tuple[float, LedgerTallies | None, float] | None = None  # (monotonic at, tallies, seconds)

    def snapshot(self) -> tuple[LedgerTallies | None, float]:
        """The last reading, or a new one if it is old enough (see LEDGER_CACHE_SECONDS); and what it took."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= max(self.cache_seconds,
                                                                      LEDGER_COST_FACTOR * self._cached[2]):
                t0 = time.monotonic()
                try:
                    tallies: LedgerTallies | None = self.ledger.tallies(STAGES, STAGE_BUCKETS)
                except Exception as exc:  # reported as dicomnode_ledger_up 0; /healthz names it
                    log.warning("metrics: the ledger could not be read: %s", str(exc).splitlines()[0] if str(exc)
                                else type(exc).__name__)
                    tallies = None
                self._cached = (time.monotonic(), tallies, time.monotonic() - t0)
            return self._cached[1], self._cached[2]

    def collect(self) -> Iterable[Metric]:
        t, secs = self.snapshot()
        yield GaugeMetricFamily("dicomnode_ledger_up", "1 if the ledger could be read for these metrics",
                                value=0 if t is None else 1)
        yield GaugeMetricFamily("dicomnode_ledger_query_seconds", "Time the ledger tallies took to read", value=secs)
        if t is None:
            return
        series = GaugeMetricFamily("dicomnode_series", "Series in the ledger by state", labels=["state"])
        for state, n in t.series.items():
            series.add_metric([state], n)
        yield series
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the ledger by state", labels=["state"])
        for state, n in t.jobs.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("dicomnode_ledger_instances", "Instances recorded in the ledger (every receiver)",
                                value=t.instances)
        rejected = CounterMetricFamily("dicomnode_instances_rejected",
                                       "Instances answered with a failure status, by status (ledger)",
                                       labels=["status"])
        for status, n in sorted(t.rejected_instances.items()):
            rejected.add_metric([f"0x{status:04X}"], n)
        yield rejected
        attempts = CounterMetricFamily("dicomnode_delivery_attempts",
                                       "C-STORE attempts of synthetic instances, by destination (ledger)",
                                       labels=["destination"])
        failures = CounterMetricFamily("dicomnode_delivery_failures",
                                       "Delivery attempts that did not end with the instance stored, by destination "
                                       "(ledger)", labels=["destination"])
        for dest, d in sorted(t.deliveries.items()):
            attempts.add_metric([dest], d.attempts)
            failures.add_metric([dest], d.failures)
        yield attempts
        yield failures
        stages = HistogramMetricFamily("dicomnode_stage_duration_seconds",
                                       "Duration of each stage of finished job runs (ledger)", labels=["stage"])
        for stage, h in t.stages.items():
            stages.add_metric([stage], h.cumulative(), sum_value=h.total)
        yield stages


class WorkerSlots(Protocol):
    """``serve``'s worker pool as monitoring sees it (:class:`dicom_node.serve.WorkerPool`)."""

    restarts: int

    def slots(self) -> Sequence[SlotView]: ...


class ProcessView(Protocol):
    """One child process of ``serve`` (a worker or a receiver) as monitoring sees it."""

    @property
    def index(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...


class SlotView(ProcessView, Protocol):
    @property
    def last_exit_code(self) -> int | None: ...

    @property
    def seconds_since_restart(self) -> float | None: ...


def ready_reports(storage_dir: Path, pool: WorkerSlots | None) -> dict[int, ReadyReport]:
    """Slot index -> the ready report of its live worker (only reports whose PID is that worker's)."""
    out: dict[int, ReadyReport] = {}
    for slot in pool.slots() if pool is not None else ():
        if not slot.alive or slot.pid is None:
            continue
        report = read_ready(ready_path(storage_dir, slot.index))
        if report is not None and report.pid == slot.pid:
            out[slot.index] = report
    return out


class _TreeSize:
    """Bytes of the files under a folder, walked again only when the last walk is old enough (see DU_MIN_SECONDS)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._at = -1e18
        self._valid_for = 0.0
        self._bytes = 0

    def bytes(self) -> int:
        with self._lock:
            if time.monotonic() - self._at >= self._valid_for:
                t0 = time.monotonic()
                self._bytes = _du(self.root)
                self._at = time.monotonic()
                self._valid_for = max(DU_MIN_SECONDS, DU_COST_FACTOR * (self._at - t0))
            return self._bytes


def _du(root: Path) -> int:
    total = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


class LocalCollector(Collector):
    """This machine: disk, spool and output bytes, this serve's workers and the models they loaded."""

    def __init__(self, storage_dir: Path, spool_dir: Path, output_dir: Path, min_free_bytes: int,
                 configured_workers: int, pool: WorkerSlots | None) -> None:
        self.storage_dir = storage_dir
        self.spool = _TreeSize(spool_dir)
        self.output = _TreeSize(output_dir)
        self.spool_dir = spool_dir
        self.min_free_bytes = min_free_bytes
        self.configured_workers = configured_workers
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("dicomnode_build", "The dicomnode software")
        info.add_metric([], {"version": __version__})
        yield info
        try:
            free = shutil.disk_usage(self.spool_dir).free
            yield GaugeMetricFamily("dicomnode_disk_free_bytes", "Free bytes on the spool's file system", value=free)
        except OSError:
            pass
        yield GaugeMetricFamily("dicomnode_disk_free_floor_bytes",
                                "storage.min_free_mb: below this free space instances are refused",
                                value=self.min_free_bytes)
        yield GaugeMetricFamily("dicomnode_spool_bytes", "Bytes of files in the spool (received instances)",
                                value=self.spool.bytes())
        yield GaugeMetricFamily("dicomnode_output_bytes", "Bytes of files in the output tree (built series)",
                                value=self.output.bytes())
        slots = list(self.pool.slots()) if self.pool is not None else []
        reports = ready_reports(self.storage_dir, self.pool)
        yield GaugeMetricFamily("dicomnode_workers_configured", "worker.processes of this serve",
                                value=self.configured_workers)
        yield GaugeMetricFamily("dicomnode_workers", "Worker processes of this serve that are running",
                                value=sum(1 for s in slots if s.alive))
        yield GaugeMetricFamily("dicomnode_workers_ready", "Workers of this serve that have loaded their models",
                                value=len(reports))
        yield CounterMetricFamily("dicomnode_worker_restarts", "Workers of this serve that died and were restarted",
                                  value=self.pool.restarts if self.pool is not None else 0)
        models = InfoMetricFamily("dicomnode_model", "Models loaded by this serve's workers",
                                  labels=["direction"])
        seen: set[tuple[str, ...]] = set()
        for report in reports.values():
            for direction, m in sorted(report.models.items()):
                key = (direction, m.name, m.version, m.identity, m.weights_sha256, m.engine)
                if key in seen:
                    continue
                seen.add(key)
                models.add_metric([direction], {"name": m.name, "version": m.version, "identity": m.identity,
                                                "weights_sha256": m.weights_sha256, "engine": m.engine})
        yield models


def build_registry(collectors: Iterable[Collector]) -> tuple[CollectorRegistry, ReceiveCounters]:
    """A registry of its own with the process metrics, *collectors* and the receive counters."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    for c in collectors:
        registry.register(c)
    return registry, ReceiveCounters(registry)
