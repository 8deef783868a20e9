"""Quality control records: one per job (the verdict, its reasons and every check), and releasing a held job."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import delete, select, update

from storage.ledger.base import LedgerBase, rowcount, utcnow
from storage.models import Job, QCRecord
from vocab import JobState

__all__ = ["QualityRecords"]


class QualityRecords(LedgerBase):
    def record_qc(self, job_id: int, *, verdict: str, reasons: Sequence[str], checks: Mapping[str, Any],
                  model_identity: str | None) -> None:
        """Store the QC of this synthesis of *job_id* (replacing that of an earlier one; a release is kept)."""
        now = utcnow()
        with self.session() as s, s.begin():
            old = s.scalar(select(QCRecord).where(QCRecord.job_id == job_id))
            released = old.released_at if old is not None else None
            if old is not None:
                s.execute(delete(QCRecord).where(QCRecord.id == old.id))
            s.add(QCRecord(job_id=job_id, verdict=verdict, reasons=list(reasons), checks=dict(checks),
                           model_identity=model_identity, created_at=now, released_at=released))

    def qc_released(self, job_id: int) -> bool:
        """True once ``dicomnode release`` sent the job: a new synthesis of it is not held again."""
        with self.session() as s:
            return s.scalar(select(QCRecord.released_at).where(QCRecord.job_id == job_id)) is not None

    def release_job(self, job_id: int) -> None:
        """Hand a held job to delivery (a worker claims it at once).  KeyError: no such job; ValueError: not held."""
        now = utcnow()
        with self.session() as s, s.begin():
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.HELD.value).values(
                state=JobState.DELIVERING.value, next_attempt_at=now, lease_expires_at=now, worker=None))
            if rowcount(res) != 1:
                state = s.scalar(select(Job.state).where(Job.id == job_id))
                if state is None:
                    raise KeyError(f"no job {job_id}")
                raise ValueError(f"job {job_id} is {state}, not held; only a held job can be released")
            s.execute(update(QCRecord).where(QCRecord.job_id == job_id).values(released_at=now))
