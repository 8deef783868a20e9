"""Retention: remove what settled series no longer need, oldest first; never anything unfinished.

Three classes, each with its age, counted from when the series settled (the
last of its jobs finished, or it completed as not selected):

* ``spool``: its received instances (and their instance rows, whose count goes to 0);
* ``output``: the built synthetic series of its jobs (``output/job-<id>/``);
* ``ledger``: its rows (series, jobs, deliveries, runs, notes, removal records), once both above are gone.

Above the disk high-water mark, settled series lose their spool and outputs
oldest first, whatever their age, until the disk is below it again.

Order of one removal, so that a crash at any point is finished by the next
run (and ``serve`` runs one at start): (1) a removal record is written in the
ledger, after re-checking that the series is settled; (2) the files are
deleted and their folders fsynced; (3) the instance rows are deleted and the
record closed, in one transaction.  Steps 1-3 of a spool removal hold the
spool's exclusive lock, which every instance being stored holds shared, so an
instance re-sent meanwhile waits, and is then stored and recorded as new.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from dicom_node.config import RetentionConfig
from storage.ledger import Ledger, SettledSeries, utcnow
from storage.ledger.retention import OUTPUT, SPOOL
from storage.spool import Spool

__all__ = ["Disk", "PruneReport", "Pruner", "RetentionThread", "Totals"]

log = logging.getLogger(__name__)


@dataclass
class Totals:
    series: int = 0
    files: int = 0
    bytes: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)  # series per reason (age, disk)

    def add(self, files: int, size: int, reason: str) -> None:
        self.series += 1
        self.files += files
        self.bytes += size
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


@dataclass(frozen=True)
class Disk:
    used: int
    free: int

    @property
    def percent(self) -> float:
        """Used, as ``df`` shows it (of what is usable: blocks reserved for root are left out)."""
        return 100.0 * self.used / max(1, self.used + self.free)

    def freed(self, size: int) -> Disk:
        return Disk(max(0, self.used - size), self.free + size)


@dataclass
class PruneReport:
    dry_run: bool
    spool: Totals = field(default_factory=Totals)
    output: Totals = field(default_factory=Totals)
    ledger: Totals = field(default_factory=Totals)
    resumed: int = 0  # interrupted removals finished
    disk: Disk | None = None  # after the run (simulated for a dry run)
    still_over: bool = False  # above the high-water mark with nothing settled left to remove

    @property
    def removed_anything(self) -> bool:
        return bool(self.spool.series or self.output.series or self.ledger.series or self.resumed)

    def lines(self, cfg: RetentionConfig) -> list[str]:
        """One line per class, then the disk: counts and sizes only (no UIDs, no patient data)."""
        verb = "would remove" if self.dry_run else "removed"

        def why(t: Totals) -> str:
            return f" [{', '.join(f'{r} {n}' for r, n in sorted(t.by_reason.items()))}]" if t.by_reason else ""

        out = []
        if self.resumed:
            out.append(f"interrupted: finished {self.resumed} removal(s) a previous run had begun")
        out.append(f"spool: {verb} {self.spool.series} series ({self.spool.files} instances, "
                   f"{_mb(self.spool.bytes)}){why(self.spool)}")
        out.append(f"output: {verb} {self.output.series} series ({self.output.files} files, "
                   f"{_mb(self.output.bytes)}){why(self.output)}")
        out.append(f"ledger: {verb} the rows of {self.ledger.series} series")
        if self.disk is not None:
            hw = f"{cfg.high_water_percent:g}%" if cfg.high_water_percent else "off"
            floor = f"{cfg.min_free_mb} MB" if cfg.min_free_mb else "off"
            out.append(f"disk: {self.disk.percent:.1f}% used, {_mb(self.disk.free)} free (high-water {hw}, "
                       f"free floor {floor}){'; STILL ABOVE: nothing settled left to remove' if self.still_over else ''}")
        return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


class Pruner:
    def __init__(self, cfg: RetentionConfig, ledger: Ledger, spool: Spool, output_root: Path,
                 storage_dir: Path) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.spool = spool
        self.output_root = output_root
        self.storage_dir = storage_dir

    # -------------------------------------------------------------------- disk
    def disk(self) -> Disk:
        u = shutil.disk_usage(self.storage_dir)
        return Disk(u.used, u.free)

    def over(self, d: Disk) -> bool:
        hw, floor = self.cfg.high_water_percent, self.cfg.min_free_mb << 20
        return (hw > 0 and d.percent > hw) or (floor > 0 and d.free < floor)

    # --------------------------------------------------------------------- run
    def run(self, now: datetime | None = None, dry_run: bool = False) -> PruneReport:
        now = now or utcnow()
        rep = PruneReport(dry_run)
        if not dry_run:
            rep.resumed = self.finish_interrupted()
        settled = self.ledger.settled_series()
        gone: set[tuple[int, str]] = {(s.id, w) for s in settled for w, done in ((SPOOL, s.spool_pruned),
                                                                               (OUTPUT, s.output_pruned)) if done}
        cut = {SPOOL: now - timedelta(days=self.cfg.spool_days), OUTPUT: now - timedelta(days=self.cfg.output_days)}
        for ser in settled:
            for what in (SPOOL, OUTPUT):
                if (ser.id, what) not in gone and ser.settled_at <= cut[what]:
                    self._remove(ser, what, "age", rep, gone)
        disk = self.disk()
        freed_sim = 0
        for ser in settled:  # oldest first
            if not self.over(disk):
                break
            for what in (SPOOL, OUTPUT):
                if (ser.id, what) not in gone:
                    freed = self._remove(ser, what, "disk", rep, gone)
                    if dry_run:
                        freed_sim += freed
                        disk = self.disk().freed(freed_sim)
                    else:
                        disk = self.disk()
        rep.disk = disk if not dry_run else self.disk().freed(freed_sim)
        rep.still_over = self.over(rep.disk)
        ledger_cut = now - timedelta(days=self.cfg.ledger_days)
        for ser in settled:
            if ser.settled_at <= ledger_cut and (ser.id, SPOOL) in gone and (ser.id, OUTPUT) in gone:
                if dry_run or self.ledger.drop_series_rows(ser.id, ser.generation):
                    rep.ledger.add(0, 0, "age")
        return rep

    def _remove(self, ser: SettledSeries, what: str, reason: str, rep: PruneReport,
                gone: set[tuple[int, str]]) -> int:
        """Remove the *what* of one series (or, in a dry run, count it); returns the disk space it takes."""
        totals = rep.spool if what == SPOOL else rep.output
        if rep.dry_run:
            if what == SPOOL:
                paths = [self.spool.path(p) for p in self.ledger.instance_paths(ser.id)]
                files, size = self.ledger.spool_totals([ser.id]).get(ser.id, (0, 0))
            else:
                paths = self._output_files(self.ledger.output_dirs(ser.id))
                files, size = len(paths), _sizes(paths)[0]
            totals.add(files, size, reason)
            gone.add((ser.id, what))
            return _sizes(paths)[1]
        if what == SPOOL:
            with self.spool.exclusive():
                ticket = self.ledger.begin_prune(ser.id, ser.generation, SPOOL, reason)
                if ticket is None:
                    return 0  # received again (or changed) since it was listed: kept
                self.spool.remove_series_files(ticket.paths)
                self.ledger.finish_prune(ticket)
        else:
            built = self._output_files(self.ledger.output_dirs(ser.id))
            n, size = len(built), _sizes(built)[0]
            ticket = self.ledger.begin_prune(ser.id, ser.generation, OUTPUT, reason, files=n, size=size)
            if ticket is None:
                return 0
            self._remove_outputs(ticket.paths)
            self.ledger.finish_prune(ticket)
        log.debug("retention: removed the %s of series %s (generation %d; %d files, %d bytes; %s)", what,
                  ser.series_uid, ser.generation, ticket.files, ticket.bytes, reason)
        totals.add(ticket.files, ticket.bytes, reason)
        gone.add((ser.id, what))
        return ticket.bytes

    def finish_interrupted(self) -> int:
        """Finish every removal a previous run began and did not finish (a crash, a kill)."""
        n = 0
        for prune_id, sid, gen, what, reason in self.ledger.interrupted_prunes():
            if what == SPOOL:
                with self.spool.exclusive():
                    ticket = self.ledger.begin_prune(sid, gen, SPOOL, reason)
                    if ticket is not None:
                        self.spool.remove_series_files(ticket.paths)
                        self.ledger.finish_prune(ticket)
                    else:  # received again before we got back to it: only what was removed loses its rows
                        missing = [p for p in self.ledger.instance_paths(sid) if not self.spool.path(p).exists()]
                        self.ledger.abandon_prune(prune_id, sid, missing)
                        log.warning("retention: series id %d received again during an interrupted removal; "
                                    "%d instance(s) had been removed", sid, len(missing))
            else:
                ticket = self.ledger.begin_prune(sid, gen, OUTPUT, reason)
                if ticket is not None:
                    self._remove_outputs(ticket.paths)
                    self.ledger.finish_prune(ticket)
                else:
                    self.ledger.abandon_prune(prune_id, sid, [])
            n += 1
        if n:
            log.info("retention: finished %d removal(s) an earlier run had begun", n)
        return n

    # ----------------------------------------------------------------- outputs
    def _inside(self, folder: str) -> Path | None:
        p = Path(folder)
        try:
            if p.resolve().is_relative_to(self.output_root.resolve()) and p.resolve() != self.output_root.resolve():
                return p
        except OSError:
            pass
        log.error("retention: job output folder %s is not inside %s; left alone", folder, self.output_root)
        return None

    def _output_files(self, dirs: list[str]) -> list[Path]:
        out: list[Path] = []
        for d in dirs:
            p = self._inside(d)
            if p is not None and p.is_dir():
                out += [f for f in p.iterdir() if f.is_file()]
        return out

    def _remove_outputs(self, dirs: tuple[str, ...]) -> None:
        from storage.durable import fsync_dir

        for d in dirs:
            p = self._inside(d)
            if p is not None:
                shutil.rmtree(p, ignore_errors=True)
        if self.output_root.is_dir():
            fsync_dir(self.output_root)


def _sizes(paths: list[Path]) -> tuple[int, int]:
    """(bytes, disk space) of the files that exist."""
    size = space = 0
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        size += st.st_size
        space += st.st_blocks * 512
    return size, space


class RetentionThread(threading.Thread):
    """``serve``'s periodic prune: one run at start, then every ``retention.interval_minutes``."""

    def __init__(self, pruner: Pruner, interval_seconds: float) -> None:
        super().__init__(name="retention", daemon=True)
        self.pruner = pruner
        self.interval = interval_seconds
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rep = self.pruner.run()
                if rep.removed_anything:
                    for line in rep.lines(self.pruner.cfg):
                        log.info("retention: %s", line)
                if rep.still_over:
                    log.warning("retention: disk above the high-water mark and nothing settled left to remove: %s",
                                rep.lines(self.pruner.cfg)[-1])
            except Exception:  # e.g. the ledger busy: the next run tries again
                log.exception("retention run failed")
            self._stop_event.wait(self.interval)
