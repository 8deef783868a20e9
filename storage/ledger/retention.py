"""Retention in the ledger: which series are finished, and the records of what was removed.

A series may lose its files only when it is *settled*: a whitelist, so that a
state added later (e.g. a held job) is kept automatically.  Its state is one of
:data:`SETTLED_SERIES_STATES` (never ``receiving``) and every job of it is in
:data:`PRUNABLE_JOB_STATES` (a selected series needs at least one job).

The order of a removal (see :mod:`dicom_node.prune`): :meth:`begin_prune`
re-checks the series and writes a :class:`~storage.models.Prune` row with an
empty ``finished_at`` *before* a file goes; the files are deleted; then
:meth:`finish_prune` deletes the instance rows (spool) and fills
``finished_at``, in one transaction.  A removal cut short leaves its row
unfinished, and :meth:`interrupted_prunes` finds it for the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Sequence

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from storage.ledger.base import LedgerBase, utcnow
from storage.models import Delivery, Instance, Job, JobRun, Note, Prune, QCRecord, Series
from vocab import JobState, SeriesState

__all__ = ["PRUNABLE_JOB_STATES", "SETTLED_SERIES_STATES", "PruneTicket", "Retention", "SettledSeries"]

#: the only job states whose series may lose files: finished and delivered (or replaced by a newer job)
PRUNABLE_JOB_STATES: tuple[str, ...] = (JobState.DONE.value, JobState.SUPERSEDED.value)
#: the only series states that may lose files: handed on (a receiving series is never touched)
SETTLED_SERIES_STATES: tuple[str, ...] = (SeriesState.SELECTED.value, SeriesState.NOT_SELECTED.value)

SPOOL, OUTPUT = "spool", "output"


@dataclass(frozen=True)
class SettledSeries:
    id: int
    series_uid: str
    study_uid: str
    generation: int
    settled_at: datetime  # when the last of it finished: completion, or its latest job
    spool_pruned: bool  # this generation's received instances were removed
    output_pruned: bool  # its built outputs were removed (or it never had any)


@dataclass(frozen=True)
class PruneTicket:
    """A removal recorded as begun: what to delete."""

    id: int
    what: str  # spool | output
    series_id: int
    series_uid: str
    study_uid: str
    generation: int
    paths: tuple[str, ...]  # spool: paths relative to the spool; output: job output folders
    files: int
    bytes: int


class Retention(LedgerBase):
    # ------------------------------------------------------------------ reading
    def settled_series(self, series_ids: Sequence[int] | None = None) -> list[SettledSeries]:
        """Every settled series (or those of *series_ids* that are), the longest settled first."""
        with self.session() as s:
            return self._settled(s, series_ids)

    def _settled(self, s: Session, series_ids: Sequence[int] | None = None) -> list[SettledSeries]:
        jobs = (select(Job.series_id, func.count().label("n"),
                       func.sum(case((Job.state.in_(PRUNABLE_JOB_STATES), 0), else_=1)).label("busy"),
                       func.max(func.coalesce(Job.finished_at, Job.created_at)).label("fin"),
                       func.sum(case((Job.output_dir.is_(None), 0), else_=1)).label("built"))
                .group_by(Job.series_id).subquery())
        q = (select(Series.id, Series.series_uid, Series.study_uid, Series.generation, Series.state,
                    Series.completed_at, Series.last_received_at, jobs.c.n, jobs.c.busy, jobs.c.fin, jobs.c.built)
             .outerjoin(jobs, jobs.c.series_id == Series.id)
             .where(Series.state.in_(SETTLED_SERIES_STATES)))
        if series_ids is not None:
            q = q.where(Series.id.in_(list(series_ids)))
        rows = s.execute(q).all()
        done = {(sid, gen, what) for sid, gen, what in s.execute(
            select(Prune.series_id, Prune.generation, Prune.what).where(Prune.finished_at.is_not(None)))
            } if self.has_table("prunes") else set()
        out: list[SettledSeries] = []
        for sid, uid, study, gen, state, completed, last, n, busy, fin, built in rows:
            n, busy, built = int(n or 0), int(busy or 0), int(built or 0)
            if busy or (state == SeriesState.SELECTED.value and n == 0):
                continue
            settled = max(t for t in (completed or last, fin) if t is not None)
            out.append(SettledSeries(sid, uid, study, gen, settled, (sid, gen, SPOOL) in done,
                                     built == 0 or (sid, gen, OUTPUT) in done))
        return sorted(out, key=lambda x: (x.settled_at, x.id))

    def spool_totals(self, series_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
        """(instances, bytes) in the spool per series."""
        ids = list(series_ids)
        totals: dict[int, tuple[int, int]] = {}
        with self.session() as s:
            for i in range(0, len(ids), 500):
                for sid, n, size in s.execute(
                        select(Instance.series_id, func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))
                        .where(Instance.series_id.in_(ids[i:i + 500])).group_by(Instance.series_id)):
                    totals[sid] = (int(n), int(size))
        return totals

    def output_dirs(self, series_id: int) -> list[str]:
        """The output folders of the series' jobs that are finished (only those may be removed)."""
        with self.session() as s:
            return self._output_dirs(s, series_id)

    @staticmethod
    def _output_dirs(s: Session, series_id: int) -> list[str]:
        return [d for d in s.scalars(select(Job.output_dir).where(
            Job.series_id == series_id, Job.state.in_(PRUNABLE_JOB_STATES), Job.output_dir.is_not(None))
            .order_by(Job.id)) if d]

    # ---------------------------------------------------------------- removing
    def begin_prune(self, series_id: int, generation: int, what: str, reason: str, *, files: int = 0,
                    size: int = 0) -> PruneTicket | None:
        """Record that the *what* of the series is about to be removed; None if it is no longer settled
        (or changed generation, or this removal is already recorded as finished).

        For the spool the caller holds the spool's exclusive lock, so no instance arrives meanwhile.
        An unfinished record of the same removal is taken up again.
        """
        with self.session() as s, s.begin():
            s.execute(select(Series.id).where(Series.id == series_id).with_for_update())  # PostgreSQL: vs receiving
            settled = self._settled(s, [series_id])
            if not settled or settled[0].generation != generation:
                return None
            ser = settled[0]
            row = s.scalar(select(Prune).where(Prune.series_id == series_id, Prune.generation == generation,
                                               Prune.what == what))
            if row is not None and row.finished_at is not None:
                return None
            if what == SPOOL:
                inst = s.execute(select(Instance.path, Instance.size_bytes).where(Instance.series_id == series_id)
                                 .order_by(Instance.id)).all()
                paths = tuple(p for p, _ in inst)
                files, size = len(inst), sum(int(b) for _, b in inst)
            else:
                paths = tuple(self._output_dirs(s, series_id))
            if row is None:
                row = Prune(series_id=series_id, generation=generation, what=what, reason=reason, files=files,
                            bytes=size, started_at=utcnow())
                s.add(row)
                s.flush()
            return PruneTicket(row.id, what, series_id, ser.series_uid, ser.study_uid, generation, paths, row.files,
                               row.bytes)

    def finish_prune(self, ticket: PruneTicket) -> None:
        """The files are gone: drop the spool's instance rows (the count with them) and close the record."""
        with self.session() as s, s.begin():
            if ticket.what == SPOOL:
                s.execute(delete(Instance).where(Instance.series_id == ticket.series_id))
                s.execute(update(Series).where(Series.id == ticket.series_id).values(instances=0))
            s.execute(update(Prune).where(Prune.id == ticket.id).values(finished_at=utcnow()))

    def abandon_prune(self, prune_id: int, series_id: int, missing: Sequence[str]) -> None:
        """Close an interrupted removal whose series is no longer settled as it was (it received again).

        The instances already removed (*missing*) lose their rows and the count follows; the rest stays.
        """
        with self.session() as s, s.begin():
            if missing:
                s.execute(delete(Instance).where(Instance.series_id == series_id, Instance.path.in_(list(missing))))
                n = s.scalar(select(func.count()).select_from(Instance).where(Instance.series_id == series_id))
                s.execute(update(Series).where(Series.id == series_id).values(instances=int(n or 0)))
            s.execute(update(Prune).where(Prune.id == prune_id).values(finished_at=utcnow(), files=len(missing)))

    def interrupted_prunes(self) -> list[tuple[int, int, int, str, str]]:
        """(prune id, series id, generation, what, reason) of removals begun and not finished."""
        with self.session() as s:
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(Prune.id, Prune.series_id, Prune.generation, Prune.what, Prune.reason)
                .where(Prune.finished_at.is_(None)).order_by(Prune.id))]

    def instance_paths(self, series_id: int) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(Instance.path).where(Instance.series_id == series_id)))

    def drop_series_rows(self, series_id: int, generation: int) -> bool:
        """Delete the ledger rows of a settled series whose files are all removed (its jobs, deliveries,
        runs, notes and removal records with it).  False if it changed meanwhile."""
        with self.session() as s, s.begin():
            s.execute(select(Series.id).where(Series.id == series_id).with_for_update())
            settled = self._settled(s, [series_id])
            if not settled or settled[0].generation != generation or not (settled[0].spool_pruned
                                                                          and settled[0].output_pruned):
                return False
            if s.scalar(select(func.count()).select_from(Instance).where(Instance.series_id == series_id)):
                return False
            jobs = select(Job.id).where(Job.series_id == series_id)
            s.execute(delete(Delivery).where(Delivery.job_id.in_(jobs)))
            s.execute(delete(JobRun).where(JobRun.job_id.in_(jobs)))
            s.execute(delete(QCRecord).where(QCRecord.job_id.in_(jobs)))
            s.execute(delete(Job).where(Job.series_id == series_id))
            s.execute(delete(Prune).where(Prune.series_id == series_id))
            s.execute(delete(Note).where(Note.series_uid == settled[0].series_uid))
            s.execute(delete(Series).where(Series.id == series_id))
            return True

