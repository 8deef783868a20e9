"""The job queue: claims with leases, progress, the end of a run, retries and supersession.

A job is claimed with a conditional UPDATE on its state and lease (``SELECT
... FOR UPDATE SKIP LOCKED`` on databases that have it), so two workers never
run the same job and a dead worker's job is taken over once its lease expires.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Collection

from sqlalchemy import ColumnElement, and_, func, or_, select, update

from storage.ledger.base import LedgerBase, rowcount, utcnow
from storage.models import Delivery, Job, JobRun, Series
from vocab import ACTIVE_JOB_STATES, Direction, JobState

__all__ = ["ClaimedJob", "JobQueue", "RetryOutcome", "worker_name"]


#: width of ``jobs.worker``; a worker's name is ``host:pid``
WORKER_NAME_WIDTH = 64
_PID_WIDTH = 7  # Linux pid_max is at most 4194304


def host_key(host: str) -> str:
    """*host* as it appears in worker names: cut to fit the column, with a digest so that cut names stay apart."""
    room = WORKER_NAME_WIDTH - 1 - _PID_WIDTH
    if len(host) <= room:
        return host
    return f"{host[:room - 9]}~{hashlib.sha1(host.encode()).hexdigest()[:8]}"


def worker_name(host: str, pid: int) -> str:
    """The ledger's name of worker process *pid* on *host* (fits ``jobs.worker`` for any host name)."""
    return f"{host_key(host)}:{pid}"


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    series_id: int
    source_series_uid: str
    generation: int
    direction: Direction
    state: JobState  # claimed from: queued, running (lease expired) or delivering
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


class JobQueue(LedgerBase):
    def claim_job(self, worker: str, lease_seconds: float, now: datetime | None = None, *,
                  directions: Collection[Direction] | None = None) -> ClaimedJob | None:
        """The next job for *worker*, leased to it; with *directions*, only jobs of those directions still to
        synthesize (a job already built, in ``delivering``, needs no model and is claimed whatever its direction)."""
        now = now or utcnow()
        expired = and_(Job.lease_expires_at.is_not(None), Job.lease_expires_at <= now, Job.next_attempt_at <= now)
        to_run = or_(
            and_(Job.state == JobState.QUEUED.value, Job.next_attempt_at <= now),
            and_(Job.state == JobState.RUNNING.value, expired),
        )
        if directions is not None:
            to_run = and_(to_run, Job.direction.in_([d.value for d in directions]))
        claimable = or_(to_run, and_(Job.state == JobState.DELIVERING.value, expired))
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
            if rowcount(res) != 1:
                return None  # another worker won the race
            j = s.get(Job, job_id)
            assert j is not None
            s.refresh(j)
            return ClaimedJob(j.id, j.series_id, j.source_series_uid, j.generation, Direction(j.direction),
                              JobState(from_state),
                              j.output_dir, j.output_series_uid, j.attempts, j.runs, j.created_at, dict(j.timings or {}),
                              queued_at=j.next_attempt_at)

    def _update_owned(self, job_id: int, worker: str, **values: Any) -> bool:
        with self.session() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker).values(**values))
            return rowcount(res) == 1

    def release_leases(self, host: str, alive: Callable[[str], bool]) -> int:
        """Make jobs held by dead workers of *host* claimable now (workers are named by :func:`worker_name`)."""
        return self._release(Job.worker.startswith(f"{host_key(host)}:", autoescape=True), lambda w: not alive(w))

    def release_own(self, worker: str) -> int:
        """A worker that stops hands its job back at once."""
        return self._release(Job.worker == worker, lambda w: True)

    def _release(self, where: ColumnElement[bool], release: Callable[[str], bool]) -> int:
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
                  output_instances: int, model_identity: str, timings: dict[str, float], held: bool = False) -> bool:
        """The output is written: on to delivery, or (*held*, in the same transaction) held by quality control."""
        extra: dict[str, Any] = {"state": JobState.HELD.value, "lease_expires_at": None} if held else {
            "state": JobState.DELIVERING.value}
        return self._update_owned(
            job_id, worker, output_dir=output_dir, output_series_uid=output_series_uid,
            output_instances=output_instances, model_identity=model_identity, timings=timings, error=None, **extra,
        )

    def job_done(self, job_id: int, worker: str, timings: dict[str, float]) -> bool:
        """Finish a job; the finished jobs of older generations of its series (same direction) become superseded.

        A job that finishes after a newer one of its series is superseded at once.
        """
        now = utcnow()
        with self.session() as s, s.begin():
            # one finishing job per series at a time: under READ COMMITTED (PostgreSQL) two generations ending
            # together would each miss the other and both stay done (SQLite serialises every writer anyway)
            series_id = s.scalar(select(Job.series_id).where(Job.id == job_id))
            s.execute(select(Series.id).where(Series.id == series_id).with_for_update())
            res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker).values(
                state=JobState.DONE.value, finished_at=now, lease_expires_at=None, timings=timings, error=None))
            if rowcount(res) != 1:
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
            # a held job of an older generation is covered too (releasing it would send a stale series)
            s.execute(update(Job).where(same, Job.generation <= j.generation,
                                        Job.state.in_([JobState.DONE.value, JobState.FAILED.value,
                                                       JobState.HELD.value]))
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
        """Start a new run of a failed or held job (or, with *force*, a done one).

        With *resend* (its built output is intact) the job goes straight to
        delivery and only instances not yet stored at a destination are sent
        (all of them again for a forced done job); otherwise it is synthesized
        from the start.  The ended run's attempts, timings and error are kept
        in ``job_runs``; the new run starts from zero.  A held job resent this way is sent as it is
        (the operator's decision, as ``release``); synthesized again, its new quality control decides.
        """
        now = utcnow()
        with self.session() as s, s.begin():
            j = s.get(Job, job_id)
            if j is None:
                raise KeyError(f"no job {job_id}")
            prev = j.state
            if prev in ACTIVE_JOB_STATES:
                raise ValueError(f"job {job_id} is {prev}; only failed, held or done jobs can be retried")
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

    def job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)
