"""The job ledger: instances, series and jobs, with their states.

Every method is one short transaction.  Concurrency rules:

* instances are unique by SOP Instance UID (a resend is idempotent);
* a series completes with a conditional UPDATE that only succeeds if no new
  instance arrived meanwhile;
* a job is claimed with a conditional UPDATE on its state and lease
  (``SELECT ... FOR UPDATE SKIP LOCKED`` on databases that have it), so two
  workers never run the same job and a dead worker's job is taken over once
  its lease expires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import and_, bindparam, case, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import check_schema, checkpoint, make_engine, make_read_only_engine, migrate
from storage.models import (
    ACTIVE_JOB_STATES,
    AssociationRejection,
    Delivery,
    Instance,
    Job,
    JobRun,
    JobState,
    Note,
    Rejection,
    Series,
    SeriesState,
)

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC (portable across SQLite and PostgreSQL ``timestamp``)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size_bytes: int
    calling_aet: str
    modality: str | None
    description: str | None
    attrs: dict[str, Any]


class InstanceConflict(Exception):
    """The SOP Instance UID is already stored in another series (nothing was written)."""

    def __init__(self, sop_instance_uid: str, stored_series_uid: str) -> None:
        super().__init__(f"SOP Instance UID already stored in series {stored_series_uid}")
        self.sop_instance_uid = sop_instance_uid
        self.stored_series_uid = stored_series_uid


@dataclass(frozen=True)
class StoredInstance:
    series_uid: str
    path: str  # relative to the spool
    transfer_syntax: str


@dataclass(frozen=True)
class RecordOutcome:
    series_id: int
    duplicate: bool  # the SOP Instance UID was already stored
    reopened: bool  # the series had been handed on and is receiving again
    generation: int


@dataclass(frozen=True)
class DueSeries:
    id: int
    series_uid: str
    study_uid: str
    instances: int
    generation: int
    calling_aet: str
    first_received_at: datetime
    last_received_at: datetime
    trigger: str  # "quiet" or "release"


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    series_id: int
    source_series_uid: str
    generation: int
    direction: str
    state: str  # state it was claimed from: queued, running (lease expired) or delivering
    output_dir: str | None
    output_series_uid: str | None
    attempts: int
    runs: int
    created_at: datetime
    timings: dict[str, float]
    queued_at: datetime | None = None  # when this run became due (its "waiting" starts here)


@dataclass(frozen=True)
class RetryOutcome:
    previous_state: str
    resend: bool  # True: the built output is sent again; False: the job runs from the start
    already_stored: dict[str, int]  # per destination, instances that will not be sent again


class _HotStatements:
    """The per-instance statements, built once (building a statement costs more than running it)."""

    def __init__(self) -> None:
        S, I = Series.__table__, Instance.__table__
        self.series_by_uid = select(S.c.id, S.c.state, S.c.generation).where(S.c.series_uid == bindparam("b_uid"))
        self.instance_by_uid = select(I.c.id, I.c.series_id).where(I.c.sop_instance_uid == bindparam("b_sop"))
        self.insert_instance = I.insert()
        self.count_instance = (
            S.update()
            .where(S.c.id == bindparam("b_sid"))
            .values(instances=S.c.instances + 1, last_received_at=bindparam("b_now"), release_seen_at=None)
        )
        # the common case in two statements: count the instance into its receiving series, insert its row
        self.count_into_receiving = (
            S.update()
            .where(S.c.series_uid == bindparam("b_uid"), S.c.state == SeriesState.RECEIVING.value)
            .values(instances=S.c.instances + 1, last_received_at=bindparam("b_now"), release_seen_at=None)
            .returning(S.c.id, S.c.generation)
        )


class Ledger:
    def __init__(self, url: str, *, background_checkpoints: bool = False, read_only: bool = False) -> None:
        """Open (creating or migrating) the ledger at *url*.

        With *read_only* (``dicomnode status``) nothing is created, migrated
        or written and no write lock is ever taken; only reading methods work.
        """
        self.url = url
        self.read_only = read_only
        self._tables: set[str] | None = None  # None: every table of the current schema exists
        if read_only:
            self.engine = make_read_only_engine(url)
            try:
                self.schema_version, self._tables = check_schema(self.engine)
            except BaseException:
                self.engine.dispose()
                raise
        else:
            self.engine = make_engine(url, background_checkpoints=background_checkpoints)
            self.schema_version = migrate(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._hot = _HotStatements()
        self._fast_path = bool(self.engine.dialect.update_returning)  # SQLite >= 3.35, PostgreSQL

    def close(self) -> None:
        self.engine.dispose()

    def has_table(self, name: str) -> bool:
        """False only for a table an older ledger, opened read-only, does not have yet."""
        return self._tables is None or name in self._tables

    def checkpoint(self) -> tuple[int, int] | None:
        """Housekeeping off the receive path (see :func:`storage.db.checkpoint`)."""
        return checkpoint(self.engine)

    def session(self) -> Session:
        return self._session()

    # ============================================================ receiving
    def stored_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """Where an instance with this SOP Instance UID is stored, if it is."""
        with self.session() as s:
            row = s.execute(select(Series.series_uid, Instance.path, Instance.transfer_syntax)
                            .join(Series, Series.id == Instance.series_id)
                            .where(Instance.sop_instance_uid == sop_instance_uid)).first()
            return None if row is None else StoredInstance(*row)

    def record_instance(self, rec: InstanceRecord, now: datetime | None = None, *,
                        replaced: bool = False) -> RecordOutcome:
        """Record a stored instance.

        A resend (same SOP Instance UID, same series) refreshes its row; with
        *replaced* its content changed: a note is written and a series already
        handed on reopens as a new generation (it is processed again).  Raises
        :class:`InstanceConflict` (nothing written) if the UID is stored in
        another series.
        """
        now = now or utcnow()
        if self._fast_path and not replaced:
            try:
                outcome = self._record_new_instance(rec, now)
            except IntegrityError:
                outcome = None  # a resend of a stored instance: rolled back, the full path below handles it
            if outcome is not None:
                return outcome
        for attempt in range(3):
            try:
                return self._record_instance(rec, now, replaced)
            except IntegrityError:
                # a concurrent association created the same series/instance first
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _instance_row(self, rec: InstanceRecord, series_id: int, now: datetime) -> dict[str, Any]:
        return {
            "sop_instance_uid": rec.sop_instance_uid, "series_id": series_id, "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax": rec.transfer_syntax, "path": rec.path, "size_bytes": rec.size_bytes,
            "calling_aet": rec.calling_aet, "received_at": now, "attrs": rec.attrs,
        }

    def _record_new_instance(self, rec: InstanceRecord, now: datetime) -> RecordOutcome | None:
        """The common case, in two statements: a new instance of a series that is receiving.

        Returns None (nothing written) when the series is new or was already
        handed on; raises IntegrityError (rolled back) for a resent instance.
        """
        with self.engine.begin() as c:
            row = c.execute(self._hot.count_into_receiving, {"b_uid": rec.series_uid, "b_now": now}).first()
            if row is None:
                return None
            c.execute(self._hot.insert_instance, self._instance_row(rec, row[0], now))
            return RecordOutcome(row[0], duplicate=False, reopened=False, generation=row[1])

    def _reopen(self, c: Any, sid: int, generation: int, now: datetime, *, grew: bool, why: str) -> int:
        """A series already handed on receives again: it becomes a new generation; returns it."""
        S = Series.__table__
        generation += 1
        values: dict[str, Any] = dict(last_received_at=now, release_seen_at=None,
                                      state=SeriesState.RECEIVING.value, generation=generation,
                                      completed_at=None, classification=None, reason=None)
        if grew:
            values["instances"] = S.c.instances + 1
        # a job not yet started is covered by the job of the new generation
        c.execute(
            update(Job)
            .where(Job.series_id == sid, Job.state == JobState.QUEUED.value)
            .values(state=JobState.SUPERSEDED.value, error=why, finished_at=now)
        )
        c.execute(S.update().where(S.c.id == sid).values(**values))
        return generation

    def _record_instance(self, rec: InstanceRecord, now: datetime, replaced: bool = False) -> RecordOutcome:
        # Every case (new series, resend, reopening): statements built once, one transaction.
        S, I, hot = Series.__table__, Instance.__table__, self._hot
        with self.engine.begin() as c:
            row = c.execute(hot.series_by_uid, {"b_uid": rec.series_uid}).first()
            if row is None:
                sid = c.execute(S.insert().values(
                    study_uid=rec.study_uid, series_uid=rec.series_uid, state=SeriesState.RECEIVING.value,
                    generation=1, instances=0, calling_aet=rec.calling_aet, modality=rec.modality,
                    description=(rec.description or None) and rec.description[:128],
                    first_received_at=now, last_received_at=now,
                )).inserted_primary_key[0]
                state, generation = SeriesState.RECEIVING.value, 1
            else:
                sid, state, generation = row
            existing = c.execute(hot.instance_by_uid, {"b_sop": rec.sop_instance_uid}).first()
            if existing is not None:
                if existing[1] != sid:
                    other = c.execute(select(S.c.series_uid).where(S.c.id == existing[1])).scalar_one()
                    raise InstanceConflict(rec.sop_instance_uid, other)  # rolls back (a new series row too)
                # resend: refresh the row, no new instance
                c.execute(I.update().where(I.c.id == existing[0]).values(
                    path=rec.path, size_bytes=rec.size_bytes, transfer_syntax=rec.transfer_syntax, received_at=now,
                    attrs=rec.attrs))
                reopened = False
                if replaced:
                    c.execute(Note.__table__.insert().values(
                        at=now, calling_aet=rec.calling_aet, series_uid=rec.series_uid,
                        sop_instance_uid=rec.sop_instance_uid,
                        text="instance replaced with new content (storage.overwrite_instances = true)"
                             + ("; series reopened for processing" if state != SeriesState.RECEIVING.value else "")))
                    if state != SeriesState.RECEIVING.value:
                        generation = self._reopen(c, sid, generation, now, grew=False,
                                                  why="an instance was replaced before the job started")
                        reopened = True
                if state == SeriesState.RECEIVING.value:
                    c.execute(S.update().where(S.c.id == sid).values(last_received_at=now))
                return RecordOutcome(sid, duplicate=not replaced, reopened=reopened, generation=generation)
            c.execute(hot.insert_instance, self._instance_row(rec, sid, now))
            if state == SeriesState.RECEIVING.value:
                c.execute(hot.count_instance, {"b_sid": sid, "b_now": now})
                return RecordOutcome(sid, duplicate=False, reopened=False, generation=generation)
            # an instance for a series already handed on: reopen it as a new generation
            generation = self._reopen(c, sid, generation, now, grew=True, why="series grew before the job started")
            return RecordOutcome(sid, duplicate=False, reopened=True, generation=generation)

    def record_rejection(
        self,
        *,
        calling_aet: str,
        sop_instance_uid: str | None,
        sop_class_uid: str | None,
        status: int,
        reason: str,
    ) -> None:
        with self.session() as s, s.begin():
            s.add(
                Rejection(
                    at=utcnow(),
                    calling_aet=calling_aet,
                    sop_instance_uid=(sop_instance_uid or None) and str(sop_instance_uid)[:128],
                    sop_class_uid=(sop_class_uid or None) and str(sop_class_uid)[:128],
                    status=status,
                    reason=reason,
                )
            )

    #: association rejections kept (older ones are dropped, so a flood of rejected peers cannot fill the disk)
    KEEP_ASSOCIATION_REJECTIONS = 1000

    def record_association_rejection(self, *, calling_aet: str, called_aet: str, peer: str, result: str,
                                     reason: str) -> None:
        with self.session() as s, s.begin():
            row = AssociationRejection(at=utcnow(), calling_aet=calling_aet[:16], called_aet=called_aet[:16],
                                       peer=peer[:64], result=result[:32], reason=reason)
            s.add(row)
            s.flush()
            s.execute(AssociationRejection.__table__.delete().where(
                AssociationRejection.id <= row.id - self.KEEP_ASSOCIATION_REJECTIONS))

    def mark_released(self, series_uids: Iterable[str], now: datetime | None = None) -> None:
        uids = list(series_uids)
        if not uids:
            return
        with self.session() as s, s.begin():
            s.execute(
                update(Series)
                .where(Series.series_uid.in_(uids), Series.state == SeriesState.RECEIVING.value)
                .values(release_seen_at=now or utcnow())
            )

    def known_instance_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Instance.path)))

    # ============================================================ completion
    def due_series(self, quiet_seconds: float, release_grace_seconds: float | None,
                   now: datetime | None = None) -> list[DueSeries]:
        now = now or utcnow()
        quiet_cut = now - timedelta(seconds=quiet_seconds)
        conds = [Series.last_received_at <= quiet_cut]
        if release_grace_seconds is not None:
            rel_cut = now - timedelta(seconds=release_grace_seconds)
            conds.append(and_(Series.release_seen_at.is_not(None), Series.release_seen_at <= rel_cut,
                              Series.last_received_at <= Series.release_seen_at))
        with self.session() as s:
            rows = s.scalars(
                select(Series).where(Series.state == SeriesState.RECEIVING.value, or_(*conds)).order_by(Series.id)
            ).all()
            return [
                DueSeries(
                    r.id, r.series_uid, r.study_uid, r.instances, r.generation, r.calling_aet,
                    r.first_received_at, r.last_received_at,
                    "quiet" if r.last_received_at <= quiet_cut else "release",
                )
                for r in rows
            ]

    def series_attrs(self, series_id: int) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.execute(
                select(Instance.attrs, Instance.sop_class_uid).where(Instance.series_id == series_id)
            ).all()
            return [dict(a or {}, sop_class_uid=c) for a, c in rows]

    def series_files(self, series_uid: str) -> list[str]:
        with self.session() as s:
            sid = s.scalar(select(Series.id).where(Series.series_uid == series_uid))
            if sid is None:
                return []
            return list(s.scalars(select(Instance.path).where(Instance.series_id == sid).order_by(Instance.id)))

    def complete_series(
        self,
        due: DueSeries,
        *,
        classification: str,
        reason: str,
        direction: str | None,
        now: datetime | None = None,
    ) -> int | None | bool:
        """Hand a quiet series on.  Returns the new job id, ``None`` when the
        series is not selected, or ``False`` when it changed meanwhile (retry later)."""
        now = now or utcnow()
        selected = direction is not None
        with self.session() as s, s.begin():
            res = s.execute(
                update(Series)
                .where(
                    Series.id == due.id,
                    Series.state == SeriesState.RECEIVING.value,
                    Series.instances == due.instances,
                    Series.generation == due.generation,
                    Series.last_received_at == due.last_received_at,
                )
                .values(
                    state=(SeriesState.SELECTED if selected else SeriesState.NOT_SELECTED).value,
                    classification=classification,
                    reason=reason,
                    completed_at=now,
                )
            )
            if res.rowcount != 1:
                return False
            if not selected:
                return None
            job = Job(
                series_id=due.id,
                source_series_uid=due.series_uid,
                generation=due.generation,
                direction=direction,
                state=JobState.QUEUED.value,
                next_attempt_at=now,
                created_at=now,
                timings={},
            )
            s.add(job)
            s.flush()
            return job.id

    # ============================================================ jobs
    def claim_job(self, worker: str, lease_seconds: float, now: datetime | None = None) -> ClaimedJob | None:
        now = now or utcnow()
        claimable = or_(
            and_(Job.state == JobState.QUEUED.value, Job.next_attempt_at <= now),
            and_(
                Job.state.in_([JobState.RUNNING.value, JobState.DELIVERING.value]),
                Job.lease_expires_at.is_not(None),
                Job.lease_expires_at <= now,
                Job.next_attempt_at <= now,
            ),
        )
        lease = now + timedelta(seconds=lease_seconds)
        with self.session() as s, s.begin():
            cand = s.execute(
                select(Job.id, Job.state).where(claimable).order_by(Job.next_attempt_at, Job.id).limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if cand is None:
                return None
            job_id, from_state = cand
            new_state = JobState.DELIVERING.value if from_state == JobState.DELIVERING.value else JobState.RUNNING.value
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, claimable)
                .values(state=new_state, worker=worker, lease_expires_at=lease, runs=Job.runs + 1,
                        started_at=func.coalesce(Job.started_at, now))
            )
            if res.rowcount != 1:
                return None  # another worker won the race
            j = s.get(Job, job_id)
            assert j is not None
            s.refresh(j)
            return ClaimedJob(j.id, j.series_id, j.source_series_uid, j.generation, j.direction, from_state,
                              j.output_dir, j.output_series_uid, j.attempts, j.runs, j.created_at, dict(j.timings or {}),
                              queued_at=j.next_attempt_at)

    def _update_owned(self, job_id: int, worker: str, **values: Any) -> bool:
        with self.session() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker).values(**values))
            return res.rowcount == 1

    def release_leases(self, host: str, alive: Callable[[str], bool]) -> int:
        """Make jobs held by dead workers of *host* claimable now (workers are named host:pid)."""
        return self._release(Job.worker.like(f"{host}:%"), lambda w: not alive(w))

    def release_own(self, worker: str) -> int:
        """A worker that stops hands its job back at once."""
        return self._release(Job.worker == worker, lambda w: True)

    def _release(self, where: Any, release: Callable[[str], bool]) -> int:
        now = utcnow()
        n = 0
        with self.session() as s, s.begin():
            for j in s.scalars(select(Job).where(Job.state.in_([JobState.RUNNING.value, JobState.DELIVERING.value]),
                                                 where)):
                if j.worker and release(j.worker):
                    j.lease_expires_at = max(now, j.next_attempt_at) if j.state == JobState.DELIVERING.value else now
                    n += 1
        return n

    def renew_lease(self, job_id: int, worker: str, lease_seconds: float) -> bool:
        return self._update_owned(job_id, worker, lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))

    def job_running(self, job_id: int, worker: str, timings: dict[str, float], **values: Any) -> bool:
        return self._update_owned(job_id, worker, timings=timings, **values)

    def job_built(self, job_id: int, worker: str, *, output_dir: str, output_series_uid: str,
                  output_instances: int, model_identity: str, timings: dict[str, float]) -> bool:
        return self._update_owned(
            job_id, worker, state=JobState.DELIVERING.value, output_dir=output_dir,
            output_series_uid=output_series_uid, output_instances=output_instances,
            model_identity=model_identity, timings=timings, error=None,
        )

    def job_done(self, job_id: int, worker: str, timings: dict[str, float]) -> bool:
        """Finish a job; the finished jobs of older generations of its series (same direction) become superseded.

        A job that finishes after a newer one of its series is superseded at once.
        """
        now = utcnow()
        with self.session() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker).values(
                state=JobState.DONE.value, finished_at=now, lease_expires_at=None, timings=timings, error=None))
            if res.rowcount != 1:
                return False
            j = s.get(Job, job_id)
            assert j is not None
            same = and_(Job.series_id == j.series_id, Job.direction == j.direction, Job.id != j.id)
            newer = s.scalars(select(Job).where(same, Job.state.in_([JobState.DONE.value, JobState.SUPERSEDED.value]),
                                                Job.generation > j.generation).order_by(Job.id.desc()).limit(1)).first()
            if newer is not None:
                j.state = JobState.SUPERSEDED.value
                j.error = f"superseded by job {newer.id} (synthetic series {newer.output_series_uid})"
                return True
            s.execute(update(Job).where(same, Job.generation <= j.generation,
                                        Job.state.in_([JobState.DONE.value, JobState.FAILED.value]))
                      .values(state=JobState.SUPERSEDED.value,
                              error=f"superseded by job {j.id} (synthetic series {j.output_series_uid})"))
            return True

    def previous_output(self, job_id: int) -> str | None:
        """The synthetic series of the latest earlier job of the same series and direction, if one was built."""
        with self.session() as s:
            j = s.get(Job, job_id)
            if j is None:
                return None
            return s.scalar(select(Job.output_series_uid).where(
                Job.series_id == j.series_id, Job.direction == j.direction, Job.id < j.id,
                Job.output_series_uid.is_not(None), Job.output_series_uid != "").order_by(Job.id.desc()).limit(1))

    def job_failed(self, job_id: int, worker: str, error: str, timings: dict[str, float] | None = None) -> bool:
        values: dict[str, Any] = dict(state=JobState.FAILED.value, finished_at=utcnow(), lease_expires_at=None,
                                      error=error[:2000])
        if timings is not None:
            values["timings"] = timings
        return self._update_owned(job_id, worker, **values)

    def job_retry_later(self, job_id: int, worker: str, error: str, delay_seconds: float,
                        timings: dict[str, float]) -> bool:
        """A retryable delivery failure: keep the built output, try again after *delay_seconds*."""
        at = utcnow() + timedelta(seconds=delay_seconds)
        return self._update_owned(job_id, worker, state=JobState.DELIVERING.value, next_attempt_at=at,
                                  lease_expires_at=at, attempts=Job.attempts + 1, error=error[:2000],
                                  timings=timings)

    def retry_job(self, job_id: int, *, resend: bool, force: bool = False) -> RetryOutcome:
        """Start a new run of a failed job (or, with *force*, a done one).

        With *resend* (its built output is intact) the job goes straight to
        delivery and only instances not yet stored at a destination are sent
        (all of them again for a forced done job); otherwise it is synthesized
        from the start.  The ended run's attempts, timings and error are kept
        in ``job_runs``; the new run starts from zero.
        """
        now = utcnow()
        with self.session() as s, s.begin():
            j = s.get(Job, job_id)
            if j is None:
                raise KeyError(f"no job {job_id}")
            prev = j.state
            if prev in ACTIVE_JOB_STATES:
                raise ValueError(f"job {job_id} is {prev}; only failed or done jobs can be retried")
            if prev == JobState.DONE.value and not force:
                raise ValueError(f"job {job_id} is done (every instance delivered); --force sends it again")
            if prev == JobState.SUPERSEDED.value:
                raise ValueError(f"job {job_id} is superseded; a newer job of the same series covers it")
            s.add(JobRun(job_id=job_id, state=prev, error=j.error, attempts=j.attempts, started_at=j.started_at,
                         finished_at=j.finished_at, timings=dict(j.timings or {})))
            if not resend or prev == JobState.DONE.value:
                # new content (or an explicit resend of everything): nothing counts as stored any more
                s.execute(update(Delivery).where(Delivery.job_id == job_id).values(stored=False))
            j.state = (JobState.DELIVERING if resend else JobState.QUEUED).value
            j.next_attempt_at = now
            j.lease_expires_at = now if resend else None  # a delivering job is claimable once its lease is past
            j.worker = None
            j.attempts = 0
            j.error = None
            j.started_at = None
            j.finished_at = None
            j.timings = {}
            stored = {
                d: int(n) for d, n in s.execute(
                    select(Delivery.destination, func.count())
                    .where(Delivery.job_id == job_id, Delivery.stored.is_(True)).group_by(Delivery.destination))
            }
            return RetryOutcome(prev, resend, stored)

    def failed_job_ids(self) -> list[int]:
        with self.session() as s:
            return list(s.scalars(select(Job.id).where(Job.state == JobState.FAILED.value).order_by(Job.id)))

    def stored_instances(self, job_id: int, destination: str) -> set[str]:
        """SOP Instance UIDs of the job that *destination* has confirmed as stored."""
        with self.session() as s:
            return set(s.scalars(select(Delivery.sop_instance_uid).where(
                Delivery.job_id == job_id, Delivery.destination == destination, Delivery.stored.is_(True))))

    def record_deliveries(self, job_id: int, destination: str, outcomes: Sequence[tuple[str, int | None, bool, str]]) -> None:
        """Upsert (sop_instance_uid, status, stored, detail) rows for one destination."""
        now = utcnow()
        with self.session() as s, s.begin():
            existing = {
                d.sop_instance_uid: d
                for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination))
            }
            for uid, status, stored, detail in outcomes:
                d = existing.get(uid)
                if d is None:
                    d = Delivery(job_id=job_id, destination=destination, sop_instance_uid=uid, attempts=0)
                    s.add(d)
                d.status = status
                d.stored = stored
                d.detail = detail
                d.attempts = (d.attempts or 0) + 1
                d.updated_at = now

    def delivered_destinations(self, job_id: int, expected: int) -> set[str]:
        """Destinations where all *expected* instances of the job are stored."""
        with self.session() as s:
            rows = s.execute(
                select(Delivery.destination, func.count())
                .where(Delivery.job_id == job_id, Delivery.stored.is_(True))
                .group_by(Delivery.destination)
            ).all()
            return {d for d, n in rows if n >= expected}

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

    def job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    # ============================================================ reading
    #: what ``status(state=...)`` accepts: series states, job states, and "retrying" (delivering after a failed attempt)
    STATES = tuple(dict.fromkeys([*(x.value for x in SeriesState), *(x.value for x in JobState), "retrying"]))

    def status(self, *, state: str | None = None, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        with self.session() as s:
            sq = select(Series).order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit)
            jq = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            if state == "retrying":
                sq = sq.where(false())
                jq = jq.where(Job.state == JobState.DELIVERING.value, Job.attempts > 0)
            elif state:
                sq = sq.where(Series.state == state)
                jq = jq.where(Job.state == state)
            series = [
                {
                    "study_uid": r.study_uid,
                    "series_uid": r.series_uid,
                    "state": r.state,
                    "instances": r.instances,
                    "calling_aet": r.calling_aet,
                    "modality": r.modality,
                    "description": r.description,
                    "classification": r.classification,
                    "reason": r.reason,
                    "generation": r.generation,
                    "first_received_at": iso(r.first_received_at),
                    "last_received_at": iso(r.last_received_at),
                    "completed_at": iso(r.completed_at),
                }
                for r in s.scalars(sq)
            ]
            jobs = [
                {
                    "id": j.id,
                    "state": j.state,
                    "direction": j.direction,
                    "source_series_uid": j.source_series_uid,
                    "output_series_uid": j.output_series_uid,
                    "output_instances": j.output_instances,
                    "error": j.error,
                    "attempts": j.attempts,
                    "worker": j.worker,
                    "created_at": iso(j.created_at),
                    "started_at": iso(j.started_at),
                    "finished_at": iso(j.finished_at),
                    "next_attempt_at": iso(j.next_attempt_at) if j.state == JobState.DELIVERING.value else None,
                    # a delivery attempt failed and the next one is scheduled
                    "retrying": j.state == JobState.DELIVERING.value and j.attempts > 0,
                    "timings": dict(j.timings or {}),
                }
                for j in s.scalars(jq)
            ]
            if jobs:
                counts: dict[int, dict[str, str]] = {}
                for jid, dest, stored, total in s.execute(
                    select(Delivery.job_id, Delivery.destination, func.sum(case((Delivery.stored.is_(True), 1), else_=0)),
                           func.count())
                    .where(Delivery.job_id.in_([j["id"] for j in jobs]))
                    .group_by(Delivery.job_id, Delivery.destination)
                ):
                    counts.setdefault(jid, {})[dest] = f"{int(stored or 0)}/{total} stored"
                runs: dict[int, list[dict[str, Any]]] = {}
                for r in s.scalars(select(JobRun).where(JobRun.job_id.in_([j["id"] for j in jobs]))
                                   .order_by(JobRun.id)) if self.has_table("job_runs") else ():
                    runs.setdefault(r.job_id, []).append({
                        "state": r.state, "error": r.error, "attempts": r.attempts, "started_at": iso(r.started_at),
                        "finished_at": iso(r.finished_at), "timings": dict(r.timings or {})})
                for j in jobs:
                    j["deliveries"] = counts.get(j["id"], {})
                    j["previous_runs"] = runs.get(j["id"], [])
            rejections = [
                {
                    "kind": "instance",
                    "at": iso(r.at),
                    "calling_aet": r.calling_aet,
                    "sop_instance_uid": r.sop_instance_uid,
                    "status": f"0x{r.status:04X}",
                    "reason": r.reason,
                }
                for r in s.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(limit))
            ] if not state else []
            if not state and self.has_table("association_rejections"):
                rejections += [
                    {
                        "kind": "association",
                        "at": iso(r.at),
                        "calling_aet": r.calling_aet,
                        "called_aet": r.called_aet,
                        "peer": r.peer,
                        "status": r.result,
                        "reason": r.reason,
                        "sop_instance_uid": None,
                    }
                    for r in s.scalars(select(AssociationRejection).order_by(AssociationRejection.id.desc())
                                       .limit(limit))
                ]
                rejections = sorted(rejections, key=lambda r: r["at"] or "", reverse=True)[:limit]
            notes = [
                {"at": iso(n.at), "calling_aet": n.calling_aet, "series_uid": n.series_uid,
                 "sop_instance_uid": n.sop_instance_uid, "text": n.text}
                for n in s.scalars(select(Note).order_by(Note.id.desc()).limit(limit))
            ] if not state and self.has_table("notes") else []
        return {"series": series, "jobs": jobs, "rejections": rejections, "notes": notes}
