"""Synthesis worker: claim a job, load the series, run the model, build, deliver.

Runs as its own process (started by ``dicomnode serve`` or ``dicomnode
worker``).  Models are loaded once per process and kept warm.  Every stage
is timed and recorded in the ledger; the lease is renewed while a job runs so
that only the job of a dead worker is ever taken over.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Protocol

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.children import watch_parent
from dicom_node.config import Config, Destination
from dicom_node.dispatch import Dispatcher
from storage.ledger import ClaimedJob, Ledger, utcnow, worker_name
from storage.outputs import BuiltOutput, OutputDamaged, OutputTree, check_output
from vocab import DeliveryOutcome, Direction, JobState

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset

    from dicom_node.build import Revision
    from dicom_node.monitoring.readiness import ReadyReport
    from dicom_node.volume import SeriesVolume
    from ml.inference import LoadedModel
    from ml.qc import QCResult

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A permanent failure of one job (bad series, rejected by the PACS...)."""


class _Heartbeat(threading.Thread):
    def __init__(self, ledger: Ledger, job_id: int, worker: str, lease: float) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.ledger, self.job_id, self.worker, self.lease = ledger, job_id, worker, lease
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.wait(max(1.0, self.lease / 3)):
            try:
                self.ledger.renew_lease(self.job_id, self.worker, self.lease)
            except Exception:
                log.exception("lease renewal failed for job %d", self.job_id)


@dataclass(frozen=True)
class LoadedSeries:
    """Stage *load*: the source volume and the revision its output's UIDs follow."""

    volume: SeriesVolume
    revision: Revision


@dataclass(frozen=True)
class Synthesis:
    """Stage *infer*: the synthetic pixels (source geometry, labelled later) and the model that made them."""

    model: LoadedModel
    pixels: np.ndarray


class QualityCheck(Protocol):
    """The seam of the QC stage between *infer* and *build* (:class:`dicom_node.qc_stage.QCStage` by default).

    Return the verdict (the output carries it; ``[qc] on_warn``/``on_fail`` may hold the job), or
    raise :class:`JobFailed` to stop the job with a reason.
    """

    def __call__(self, job: ClaimedJob, series: LoadedSeries, synthesis: Synthesis) -> QCResult: ...


class Worker:
    """Runs jobs: load -> infer -> (qc) -> build -> write -> deliver, each stage timed in the ledger.

    Timing names: ``waiting`` (queued to claimed), ``loading``, ``inference``,
    ``qc`` (unless ``[qc] enabled = false``), ``building`` (build and write),
    ``sending``.  A job whose QC verdict the policy holds is built but not sent: it waits in state
    ``held`` until ``dicomnode release``.
    """

    def __init__(self, cfg: Config, ledger: Ledger | None = None, *, qc: QualityCheck | None = None) -> None:
        """*qc*: the QC stage; by default :class:`~dicom_node.qc_stage.QCStage` when ``[qc] enabled``."""
        self.cfg = cfg
        self.ledger = ledger or Ledger(cfg.storage.ledger_url)
        self.name = worker_name(socket.gethostname(), os.getpid())
        self.spool_root = cfg.spool_dir
        self.outputs = OutputTree(cfg.output_dir)
        self.dispatch = Dispatcher(cfg, self.ledger)
        if qc is None and cfg.qc.enabled:
            from dicom_node.qc_header import header_checks
            from dicom_node.qc_stage import QCStage

            qc = QCStage(cfg.qc, batch_size=cfg.model.batch_size, extra=(header_checks,))
        self.qc = qc
        self._models: dict[str, LoadedModel] = {}

    # ------------------------------------------------------------ models
    def model(self, direction: Direction) -> LoadedModel:
        m = self._models.get(direction.value)
        if m is None:
            from ml.inference import load_model

            override = self.cfg.model.t1_to_t2 if direction is Direction.T1_TO_T2 else self.cfg.model.t2_to_t1
            t0 = time.monotonic()
            m = load_model(override or self.cfg.model.checkpoint, direction=direction.value, device=self.cfg.model.device,
                           engine=self.cfg.model.engine)
            log.info("model %s (%s) loaded in %.1f s, engine %s, device %s", m.name, m.identity, time.monotonic() - t0,
                     m.engine.value, m.device)
            self._models[direction.value] = m
        return m

    # ------------------------------------------------------------ loop
    def warm_up(self) -> dict[str, str]:
        """Load the models before the first job, so the first series waits no longer than the others.

        Returns why a direction's model could not be loaded (empty: all loaded).
        """
        errors: dict[str, str] = {}
        for direction in self.cfg.model.directions:
            try:
                self.model(direction)
            except Exception as exc:  # this worker takes no job of this direction until it loads
                log.error("model for %s could not be loaded (its jobs are left to other workers; trying again "
                          "every %.0f s): %s", direction.value, self.cfg.worker.model_retry_seconds, exc)
                errors[direction.value] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return errors

    def ready_report(self, errors: dict[str, str]) -> ReadyReport:
        """What ``serve``'s health check and metrics learn about this worker once it is warm."""
        from dicom_node.monitoring.readiness import LoadedModelInfo, ReadyReport

        return ReadyReport(os.getpid(), {
            d: LoadedModelInfo(m.name, m.version, m.identity, str(m.metadata.get("_weights_sha256", "")),
                               m.engine.value)
            for d, m in self._models.items()}, errors)

    def _report(self, errors: dict[str, str], on_ready: Callable[[ReadyReport], None] | None) -> None:
        if on_ready is not None:
            try:
                on_ready(self.ready_report(errors))
            except Exception as exc:  # the node runs on; its health check says the worker is not ready
                log.error("could not report this worker ready: %s", exc)

    def run(self, stop: threading.Event, on_ready: Callable[[ReadyReport], None] | None = None) -> None:
        errors = self.warm_up()
        self._report(errors, on_ready)
        retry_at = time.monotonic() + self.cfg.worker.model_retry_seconds
        log.info("worker %s polling the ledger", self.name)
        unreachable = False
        while not stop.is_set():
            if errors and time.monotonic() >= retry_at:  # e.g. a checkpoint replaced, a GPU back
                errors = self.warm_up()
                self._report(errors, on_ready)
                retry_at = time.monotonic() + self.cfg.worker.model_retry_seconds
                if not errors:
                    log.info("worker %s: every model loaded now", self.name)
            # a direction whose model did not load is left to workers that have it: its jobs wait, not fail
            usable = [d for d in self.cfg.model.directions if d.value not in errors] if errors else None
            try:
                job = self.ledger.claim_job(self.name, self.cfg.worker.lease_seconds, directions=usable)
            except SQLAlchemyError as exc:  # e.g. a PostgreSQL ledger on another machine restarts
                if not unreachable:
                    log.warning("ledger unreachable (%s); trying again every %.1f s",
                                str(getattr(exc, "orig", None) or exc).splitlines()[0], self.cfg.worker.poll_seconds)
                unreachable = True
                stop.wait(self.cfg.worker.poll_seconds)
                continue
            if unreachable:
                log.info("ledger reachable again")
                unreachable = False
            if job is None:
                stop.wait(self.cfg.worker.poll_seconds)
                continue
            self.process(job)

    def process(self, job: ClaimedJob) -> None:
        hb = _Heartbeat(self.ledger, job.id, self.name, self.cfg.worker.lease_seconds)
        hb.start()
        timings = dict(job.timings)
        if "waiting" not in timings:
            timings["waiting"] = round((utcnow() - (job.queued_at or job.created_at)).total_seconds(), 3)
        try:
            self._process(job, timings)
        except JobFailed as exc:
            log.error("job %d (series %s) failed: %s", job.id, job.source_series_uid, exc)
            self.ledger.job_failed(job.id, self.name, str(exc), timings)
        except Exception as exc:
            log.exception("job %d (series %s) failed unexpectedly", job.id, job.source_series_uid)
            self.ledger.job_failed(job.id, self.name, f"internal error: {type(exc).__name__}: {exc}", timings)
        finally:
            hb.stop_evt.set()

    def _process(self, job: ClaimedJob, timings: dict[str, float]) -> None:
        direction = Direction(job.direction)
        built = self._existing_output(job)
        if built is None:
            built = self._synthesize(job, direction, timings)
            if built is None:  # held by quality control
                return
        self._deliver(job, direction, built, timings)

    def _existing_output(self, job: ClaimedJob) -> BuiltOutput | None:
        """Output already built by an earlier run of this job (we resume at delivery), if it is intact."""
        if job.state != JobState.DELIVERING or not job.output_dir:
            return None
        j = self.ledger.job(job.id)
        if j is None:
            return None
        try:
            return check_output(job.output_dir, j.output_instances, j.output_series_uid)
        except OutputDamaged as exc:
            log.warning("job %d: built output cannot be sent again (%s); synthesizing again", job.id, exc)
            return None

    # ------------------------------------------------------------ stages
    def _synthesize(self, job: ClaimedJob, direction: Direction, timings: dict[str, float]) -> BuiltOutput | None:
        """Load, infer, check, build and write; the built output, or None when QC holds the job."""
        with _timed(timings, "loading"):
            series = self._load(job)
        self.ledger.job_running(job.id, self.name, timings)
        with _timed(timings, "inference"):
            synthesis = self._infer(direction, series)
        qc = self._check(job, series, synthesis, timings)
        with _timed(timings, "building"):
            datasets = self._build(direction, series, synthesis, qc)
            files = self._write(job, datasets)
        held = qc is not None and self._holds(qc) and not self.ledger.qc_released(job.id)
        self.ledger.job_built(job.id, self.name, output_dir=str(self.outputs.job_dir(job.id)),
                              output_series_uid=str(datasets[0].SeriesInstanceUID),
                              output_instances=len(files), model_identity=synthesis.model.identity, timings=timings,
                              held=held)
        log.info("job %d: %s series %s -> %s, %d instances (load %.1f s, inference %.1f s, qc %.1f s, build %.1f s)",
                 job.id, direction.value, job.source_series_uid, datasets[0].SeriesInstanceUID, len(files),
                 timings.get("loading", 0), timings.get("inference", 0), timings.get("qc", 0),
                 timings.get("building", 0))
        if held:
            assert qc is not None
            log.warning("job %d held by QC (%s): %s; `dicomnode release %d` sends it", job.id, qc.verdict.value,
                        "; ".join(qc.reasons) or "no reason given", job.id)
            return None
        j = self.ledger.job(job.id)
        return check_output(files[0].parent if files else None, len(files), j.output_series_uid if j else None)

    def _load(self, job: ClaimedJob) -> LoadedSeries:
        from dicom_node.build import Revision, source_digest
        from dicom_node.volume import SeriesError, load_series

        rel = self.ledger.series_files(job.source_series_uid)
        if not rel:
            raise JobFailed("no instances of the series in the ledger")
        paths = [self.spool_root / r for r in rel]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise JobFailed(f"{len(missing)} spooled instance(s) missing, e.g. {missing[0].name}")
        try:
            vol = load_series(paths)
        except SeriesError as exc:
            raise JobFailed(f"series rejected: {exc}") from None
        except Exception as exc:
            raise JobFailed(f"series could not be read: {type(exc).__name__}: {exc}") from None
        # the output's UIDs follow this exact input: a grown or changed series gets a new synthetic series
        return LoadedSeries(vol, Revision(job.generation, source_digest(paths), self.ledger.previous_output(job.id)))

    def _infer(self, direction: Direction, series: LoadedSeries) -> Synthesis:
        from ml.inference import synthesize

        try:
            model = self.model(direction)
        except Exception as exc:  # missing/corrupt checkpoint: clear reason, no traceback
            raise JobFailed(f"model for {direction.value} unavailable: {exc}") from None
        vol = series.volume
        synth = synthesize(model, vol.nifti_order(), vol.affine_ras(), batch_size=self.cfg.model.batch_size)
        return Synthesis(model, vol.from_nifti_order(synth))

    def _check(self, job: ClaimedJob, series: LoadedSeries, synthesis: Synthesis,
               timings: dict[str, float]) -> QCResult | None:
        """Stage *qc*: the verdict, recorded in the ledger (None when no QC stage is installed)."""
        if self.qc is None:
            return None
        with _timed(timings, "qc"):
            qc = self.qc(job, series, synthesis)
        self.ledger.record_qc(job.id, verdict=qc.verdict.value, reasons=qc.reasons,
                              checks=qc.to_dict()["checks"], model_identity=synthesis.model.identity)
        return qc

    def _holds(self, qc: QCResult) -> bool:
        from dicom_node.qc_stage import holds

        return holds(self.cfg.qc, qc.verdict)

    def _build(self, direction: Direction, series: LoadedSeries, synthesis: Synthesis,
               qc: QCResult | None = None) -> list[Dataset]:
        from dicom_node import __version__
        from dicom_node.build import ModelIdentity, build_synthetic_series

        pixels, model = synthesis.pixels, synthesis.model
        if self.cfg.output.burn_in_label:
            from dicom_node.label import burn_in_label, synthetic_label

            pixels = burn_in_label(pixels, synthetic_label(direction.target.value, qc.verdict.value if qc else None))
        return build_synthetic_series(
            series.volume, pixels, direction=direction,
            model=ModelIdentity(name=model.name, version=model.version, identity=model.identity),
            output=self.cfg.output, node_ae_title=self.cfg.node.ae_title, window=model.window,
            software_version=__version__, burned_in=self.cfg.output.burn_in_label, revision=series.revision, qc=qc,
        )

    def _write(self, job: ClaimedJob, datasets: list[Dataset]) -> list[Path]:
        from dicom_node.build import write_series

        return write_series(datasets, self.outputs.clear(job.id))

    def destinations_for(self, direction: Direction) -> list[Destination]:
        return self.dispatch.destinations_for(direction)

    def _deliver(self, job: ClaimedJob, direction: Direction, built: BuiltOutput, timings: dict[str, float]) -> None:
        dests = self.dispatch.destinations_for(direction)
        if not dests:
            log.warning("job %d: no destination takes %s; output kept in the spool", job.id, direction.value)
            self.ledger.job_done(job.id, self.name, timings)
            return
        with _timed(timings, "sending"):
            report = self.dispatch.send(job, built, dests)
        verdict = self.dispatch.decide(job, report)
        if verdict.outcome is DeliveryOutcome.FAILED:
            raise JobFailed(verdict.reason)
        if verdict.outcome is DeliveryOutcome.RETRY_LATER:
            log.warning("job %d: delivery attempt %d failed, retrying in %.1f s: %s", job.id, verdict.attempts,
                        verdict.delay_seconds, verdict.reason)
            self.ledger.job_retry_later(job.id, self.name, verdict.reason, verdict.delay_seconds, timings)
            return
        self.ledger.job_done(job.id, self.name, timings)
        log.info("job %d done: %d instances delivered to %s (waiting %.1f s, sending %.1f s)", job.id,
                 len(built.files), ", ".join(d.label for d in dests), timings.get("waiting", 0),
                 timings.get("sending", 0))


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the time the block takes to ``timings[name]`` (seconds, 3 decimals); a stage that fails is not timed."""
    t0 = time.monotonic()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.monotonic() - t0, 3)


def _install_signal_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        log.info("worker received %s; stopping (a job in progress is handed back)", signal.Signals(signum).name)
        stop.set()
        # a job interrupted now is resumed by the next worker when its lease is released
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)


def run_worker(cfg: Config, stop: threading.Event | None = None, ready_file: Path | None = None) -> int:
    """Run jobs until stopped; with *ready_file*, report there once the models are loaded (``serve``'s workers)."""
    stop = stop or threading.Event()
    _install_signal_handlers(stop)
    worker = Worker(cfg)
    on_ready: Callable[[ReadyReport], None] | None = None
    if ready_file is not None:
        from dicom_node.monitoring.readiness import remove_ready, write_ready

        path = ready_file
        remove_ready(path)  # a predecessor's report never stands for this worker
        on_ready = lambda report: write_ready(path, report)  # noqa: E731
    try:
        worker.run(stop, on_ready)
    except SystemExit:
        pass
    finally:
        if ready_file is not None:
            remove_ready(ready_file)
        worker.ledger.release_own(worker.name)
        worker.ledger.close()
    return 0


def slot_lock_path(cfg: Config, index: int) -> Path:
    """The lock (and PID) file of worker slot *index* of this storage folder."""
    return cfg.storage.dir / "workers" / f"slot-{index}.pid"


def hold_slot(cfg: Config, index: int) -> IO[str]:
    """Take worker slot *index* of this storage folder for this process's lifetime.

    An exclusive lock on ``<storage.dir>/workers/slot-N.pid``: a worker of an
    earlier ``serve`` that is still running (e.g. still stopping) keeps its
    slot, and the new worker waits for it, so the storage folder never has more
    than ``worker.processes`` workers of ``serve``.  The file holds the PID of
    its worker.  Returns the open file (keep it referenced).
    """
    path = slot_lock_path(cfg, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, only the PID
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            log.warning("worker slot %d is still held by worker pid %s of an earlier run; waiting for it to exit",
                        index, holder)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def worker_main(cfg: Config, index: int, log_level: str = "INFO", parent_pid: int | None = None) -> None:
    """Entry point of a worker process spawned by ``dicomnode serve``."""
    from dicom_node.logsetup import configure

    configure(log_level)
    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        if parent_pid is not None:
            watch_parent(parent_pid)
        slot = hold_slot(cfg, index)
    except SystemExit:
        return
    try:
        from dicom_node.monitoring.readiness import ready_path

        run_worker(cfg, stop, ready_file=ready_path(cfg.storage.dir, index))
    finally:
        slot.close()
