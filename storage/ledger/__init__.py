"""The job ledger: instances, series and jobs, with their states.

Every method is one short transaction.  The ledger is one class made of the
parts that own each responsibility:

* :mod:`~storage.ledger.receiving`: instances (unique by SOP Instance UID; a resend is idempotent),
  rejections, association releases;
* :mod:`~storage.ledger.completion`: due series; a series completes with a conditional UPDATE that
  only succeeds if no new instance arrived meanwhile;
* :mod:`~storage.ledger.jobs`: the job queue (claims, leases, runs, retries, supersession);
* :mod:`~storage.ledger.deliveries`: per-instance delivery outcomes per destination;
* :mod:`~storage.ledger.qc`: the quality control of each job's synthesis, and releasing a held job;
* :mod:`~storage.ledger.read`: typed read models for ``status`` and anything else that reports;
* :mod:`~storage.ledger.retention`: which series are settled (may lose files), and records of removals.
* :mod:`~storage.ledger.tallies`: counts and stage-duration histograms for ``/metrics``.
"""

from __future__ import annotations

from storage.ledger.base import LedgerBase, iso, utcnow
from storage.ledger.completion import Completion, DueSeries
from storage.ledger.deliveries import Deliveries
from storage.ledger.jobs import ClaimedJob, JobQueue, RetryOutcome, worker_name
from storage.ledger.qc import QualityRecords
from storage.ledger.read import (DeliveryCount, JobRunView, JobView, NoteView, QCView, ReadSide, RejectionView,
                                 SeriesView, StatusView)
from storage.ledger.retention import PruneTicket, Retention, SettledSeries
from storage.ledger.receiving import InstanceConflict, InstanceRecord, Receiving, RecordOutcome, StoredInstance
from storage.ledger.tallies import DeliveryTally, DurationTally, LedgerTallies, Tallies

__all__ = [
    "ClaimedJob",
    "DeliveryCount",
    "DeliveryTally",
    "DurationTally",
    "DueSeries",
    "InstanceConflict",
    "InstanceRecord",
    "JobRunView",
    "JobView",
    "Ledger",
    "LedgerBase",
    "LedgerTallies",
    "NoteView",
    "PruneTicket",
    "QCView",
    "RecordOutcome",
    "RejectionView",
    "RetryOutcome",
    "SeriesView",
    "SettledSeries",
    "StatusView",
    "StoredInstance",
    "iso",
    "utcnow",
    "worker_name",
]


class Ledger(Receiving, Completion, JobQueue, Deliveries, QualityRecords, ReadSide, Retention, Tallies):
    """The whole ledger (see the module docstring for which part owns what)."""
