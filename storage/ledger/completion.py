"""Completion: which receiving series are due, and handing one on (a job queued, or a reason recorded)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from storage.ledger.base import LedgerBase, rowcount, utcnow
from storage.models import Instance, Job, Series
from vocab import CompletionTrigger, JobState, SeriesState

__all__ = ["Completion", "DueSeries"]


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
    trigger: CompletionTrigger


class Completion(LedgerBase):
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
                    CompletionTrigger.QUIET if r.last_received_at <= quiet_cut else CompletionTrigger.RELEASE,
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
            if rowcount(res) != 1:
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
