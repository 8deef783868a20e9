"""Receiving: record stored instances (idempotent by SOP Instance UID), rejections and releases.

A series reopens as a new generation when an instance arrives (or one is
replaced) after it was handed on; its job not yet started is superseded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, Iterable

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from storage.ledger.base import LedgerBase, table, utcnow
from storage.models import AssociationRejection, Instance, Job, Note, Rejection, Series
from vocab import JobState, SeriesState

__all__ = ["InstanceConflict", "InstanceRecord", "Receiving", "RecordOutcome", "StoredInstance"]


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

    @classmethod
    def of(cls, *, sop_instance_uid: str, sop_class_uid: str, study_uid: str, series_uid: str, transfer_syntax: str,
           path: str, size_bytes: int, calling_aet: str, facts: dict[str, Any]) -> InstanceRecord:
        """A record whose modality, description and attrs come from the header facts of selection."""
        return cls(sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax, path, size_bytes,
                   calling_aet, modality=facts["modality"] or None, description=facts["description"] or None,
                   attrs=facts)


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


class _HotStatements:
    """The per-instance statements, built once (building a statement costs more than running it)."""

    def __init__(self) -> None:
        S, I = table(Series), table(Instance)
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


class Receiving(LedgerBase):
    @cached_property
    def _hot(self) -> _HotStatements:
        return _HotStatements()

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

    def _reopen(self, c: Connection, sid: int, generation: int, now: datetime, *, grew: bool, why: str) -> int:
        """A series already handed on receives again: it becomes a new generation; returns it."""
        S = table(Series)
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
        S, I, hot = table(Series), table(Instance), self._hot
        with self.engine.begin() as c:
            row = c.execute(hot.series_by_uid, {"b_uid": rec.series_uid}).first()
            if row is None:
                key = c.execute(S.insert().values(
                    study_uid=rec.study_uid, series_uid=rec.series_uid, state=SeriesState.RECEIVING.value,
                    generation=1, instances=0, calling_aet=rec.calling_aet,
                    modality=(rec.modality or None) and rec.modality[:16],  # CS: 16 at most (PostgreSQL enforces it)
                    description=(rec.description or None) and rec.description[:128],
                    first_received_at=now, last_received_at=now,
                )).inserted_primary_key
                assert key is not None
                sid = key[0]
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
                    c.execute(table(Note).insert().values(
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
            s.execute(table(AssociationRejection).delete().where(
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
