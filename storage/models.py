"""Ledger tables (SQLAlchemy 2.x declarative).  Plain, portable column types only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from vocab.states import ACTIVE_JOB_STATES, JobState, SeriesState

__all__ = ["ACTIVE_JOB_STATES", "AssociationRejection", "Base", "Delivery", "Instance", "Job", "JobRun", "JobState", "Meta",
           "Note", "Prune", "QCRecord", "Rejection", "Series", "SeriesState"]


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    description: Mapped[str | None] = mapped_column(String(128), nullable=True)
    classification: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    release_seen_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(256))  # relative to the spool
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_aet: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON)  # header facts used by selection (no patient data)


class Rejection(Base):
    """An instance we answered with a failure status (it is not stored)."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    direction: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    output_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_dir: Mapped[str | None] = mapped_column(String(256), nullable=True)
    output_instances: Mapped[int] = mapped_column(Integer, default=0)
    model_identity: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # delivery attempts
    runs: Mapped[int] = mapped_column(Integer, default=0)  # times a worker claimed it
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_jobs_claim", "state", "next_attempt_at"),)


class Delivery(Base):
    """Outcome of one synthetic instance at one destination."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stored: Mapped[bool] = mapped_column(default=False)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)


class Note(Base):
    """Something an operator should know about an instance that was stored (e.g. replaced with new content)."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)


class JobRun(Base):
    """An earlier run of a job, kept when ``dicomnode retry`` starts a new one (attempts and timings per run)."""

    __tablename__ = "job_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))  # how that run ended
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)


class AssociationRejection(Base):
    """An association we rejected (unknown calling AE, wrong called AE, association limit)."""

    __tablename__ = "association_rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    calling_aet: Mapped[str] = mapped_column(String(16))
    called_aet: Mapped[str] = mapped_column(String(16))
    peer: Mapped[str] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(String(32))  # "rejected (permanent)" / "rejected (transient)"
    reason: Mapped[str] = mapped_column(Text)


class Prune(Base):
    """A removal by retention (``dicomnode prune``): written *before* anything is deleted, finished after.

    ``what`` is ``spool`` (the received instances of one generation of a series; its instance rows go
    with them) or ``output`` (the built series of its jobs).  A row whose ``finished_at`` is empty is a
    removal that was interrupted: the next prune (or ``serve``'s start) finishes it.  The rows of a
    series go when its ledger rows do.
    """

    __tablename__ = "prunes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    what: Mapped[str] = mapped_column(String(16))  # spool | output
    reason: Mapped[str] = mapped_column(String(16))  # age | disk
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)

    __table_args__ = (UniqueConstraint("series_id", "generation", "what"),)


class QCRecord(Base):
    """The quality control of a job's synthesis (one row per job; a new synthesis of the job replaces it)."""

    __tablename__ = "qc_results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    verdict: Mapped[str] = mapped_column(String(8))  # pass / warn / fail
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    checks: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # name -> value, threshold, verdict, reason
    model_identity: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    released_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # ``dicomnode release``
