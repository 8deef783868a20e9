"""The read side: typed read models of series, jobs, rejections and notes, newest first.

Nothing here is formatted for display; ``dicomnode status`` (and anything
else that reports) formats these.  Works on a read-only ledger; tables an
older ledger does not have yet read as empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import case, false, func, select

from storage.ledger.base import LedgerBase, iso
from storage.models import AssociationRejection, Delivery, Instance, Job, JobRun, Note, QCRecord, Rejection, Series
from vocab import RETRYING, JobState

__all__ = ["DeliveryCount", "JobRunView", "JobView", "NoteView", "QCView", "ReadSide", "RejectionView",
           "SeriesView", "StatusView"]


@dataclass(frozen=True)
class SeriesView:
    study_uid: str
    series_uid: str
    state: str
    instances: int
    calling_aet: str
    modality: str | None
    description: str | None
    classification: str | None
    reason: str | None
    generation: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True)
class DeliveryCount:
    stored: int
    total: int


@dataclass(frozen=True)
class JobRunView:
    """An earlier run of a job (kept when ``dicomnode retry`` started a new one)."""

    state: str
    error: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, float]


@dataclass(frozen=True)
class QCView:
    """The quality control of a job's synthesis: the verdict, why, and every check (name -> value, threshold,
    verdict, reason)."""

    verdict: str
    reasons: tuple[str, ...]
    checks: dict[str, dict[str, Any]]
    model_identity: str | None
    created_at: datetime
    released_at: datetime | None = None


@dataclass(frozen=True)
class JobView:
    id: int
    state: str
    direction: str
    source_series_uid: str
    output_series_uid: str | None
    output_instances: int
    error: str | None
    attempts: int
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None  # only while delivering
    retrying: bool  # a delivery attempt failed and the next one is scheduled
    timings: dict[str, float]
    deliveries: dict[str, DeliveryCount] = field(default_factory=dict)  # per destination
    previous_runs: tuple[JobRunView, ...] = ()
    qc: QCView | None = None  # None: no quality control ran (yet)


@dataclass(frozen=True)
class RejectionView:
    """An instance answered with a failure status (``status``), or an association rejected (``result``)."""

    kind: str  # "instance" or "association"
    at: datetime
    calling_aet: str
    reason: str
    sop_instance_uid: str | None = None
    status: int | None = None  # instance: the C-STORE status we answered
    called_aet: str | None = None  # association: what the peer called, who it was, the A-ASSOCIATE-RJ result
    peer: str | None = None
    result: str | None = None


@dataclass(frozen=True)
class NoteView:
    at: datetime
    calling_aet: str
    series_uid: str
    sop_instance_uid: str
    text: str


@dataclass(frozen=True)
class StatusView:
    series: list[SeriesView]
    jobs: list[JobView]
    rejections: list[RejectionView]
    notes: list[NoteView]


class ReadSide(LedgerBase):
    def first_instance_paths(self, series_uids: Sequence[str]) -> dict[str, str]:
        """Spool path (relative) of the first instance received of each series."""
        if not series_uids:
            return {}
        with self.session() as s:
            first = (select(func.min(Instance.id).label("iid")).join(Series, Series.id == Instance.series_id)
                     .where(Series.series_uid.in_(list(series_uids))).group_by(Instance.series_id).subquery())
            rows = s.execute(select(Series.series_uid, Instance.path).join(Series, Series.id == Instance.series_id)
                             .where(Instance.id.in_(select(first.c.iid))))
            return {uid: path for uid, path in rows}

    def status(self, *, state: str | None = None, limit: int = 50) -> StatusView:
        """Series and jobs (in *state*, if given: see :data:`vocab.STATUS_FILTERS`), newest first; without
        *state* also the latest rejections and notes."""
        with self.session() as s:
            sq = select(Series).order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit)
            jq = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if state == RETRYING:
                sq = sq.where(false())
                jq = jq.where(Job.state == JobState.DELIVERING.value, Job.attempts > 0)
            elif state:
                sq = sq.where(Series.state == state)
                jq = jq.where(Job.state == state)
            series = [
                SeriesView(r.study_uid, r.series_uid, r.state, r.instances, r.calling_aet, r.modality, r.description,
                           r.classification, r.reason, r.generation, r.first_received_at, r.last_received_at,
                           r.completed_at)
                for r in s.scalars(sq)
            ]
            job_rows = list(s.scalars(jq))
            ids = [j.id for j in job_rows]
            counts: dict[int, dict[str, DeliveryCount]] = {}
            runs: dict[int, list[JobRunView]] = {}
            qcs: dict[int, QCView] = {}
            if ids:
                for jid, dest, stored, total in s.execute(
                    select(Delivery.job_id, Delivery.destination,
                           func.sum(case((Delivery.stored.is_(True), 1), else_=0)), func.count())
                    .where(Delivery.job_id.in_(ids))
                    .group_by(Delivery.job_id, Delivery.destination)
                ):
                    counts.setdefault(jid, {})[dest] = DeliveryCount(int(stored or 0), int(total))
                for r in s.scalars(select(JobRun).where(JobRun.job_id.in_(ids))
                                   .order_by(JobRun.id)) if self.has_table("job_runs") else ():
                    runs.setdefault(r.job_id, []).append(JobRunView(r.state, r.error, r.attempts, r.started_at,
                                                                    r.finished_at, dict(r.timings or {})))
                for q in s.scalars(select(QCRecord).where(QCRecord.job_id.in_(ids))) if self.has_table("qc_results") \
                        else ():
                    qcs[q.job_id] = QCView(q.verdict, tuple(q.reasons or ()), dict(q.checks or {}), q.model_identity,
                                           q.created_at, q.released_at)
            delivering = JobState.DELIVERING.value
            jobs = [
                JobView(j.id, j.state, j.direction, j.source_series_uid, j.output_series_uid, j.output_instances,
                        j.error, j.attempts, j.worker, j.created_at, j.started_at, j.finished_at,
                        next_attempt_at=j.next_attempt_at if j.state == delivering else None,
                        retrying=j.state == delivering and j.attempts > 0, timings=dict(j.timings or {}),
                        deliveries=counts.get(j.id, {}), previous_runs=tuple(runs.get(j.id, [])),
                        qc=qcs.get(j.id))
                for j in job_rows
            ]
            rejections = [
                RejectionView("instance", r.at, r.calling_aet, r.reason, sop_instance_uid=r.sop_instance_uid,
                              status=r.status)
                for r in s.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(limit))
            ] if not state else []
            if not state and self.has_table("association_rejections"):
                rejections += [
                    RejectionView("association", r.at, r.calling_aet, r.reason, called_aet=r.called_aet, peer=r.peer,
                                  result=r.result)
                    for r in s.scalars(select(AssociationRejection).order_by(AssociationRejection.id.desc())
                                       .limit(limit))
                ]
                # newest first, as the timestamps are shown (to the millisecond); ties keep instances first
                rejections = sorted(rejections, key=lambda r: iso(r.at) or "", reverse=True)[:limit]
            notes = [
                NoteView(n.at, n.calling_aet, n.series_uid, n.sop_instance_uid, n.text)
                for n in s.scalars(select(Note).order_by(Note.id.desc()).limit(limit))
            ] if not state and self.has_table("notes") else []
        return StatusView(series, jobs, rejections, notes)
