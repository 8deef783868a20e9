"""Deliveries: per instance and destination, what the destination answered and whether it is stored."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, select

from storage.ledger.base import LedgerBase, utcnow
from storage.models import Delivery

__all__ = ["Deliveries"]


class Deliveries(LedgerBase):
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
