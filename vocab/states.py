"""States the ledger records: of a series, of a job, and what one delivery attempt came to."""

from __future__ import annotations

import enum

__all__ = ["ACTIVE_JOB_STATES", "RETRYING", "STATUS_FILTERS", "UNFINISHED_JOB_STATES", "CompletionTrigger",
           "DeliveryOutcome", "JobState", "QCAction", "SeriesState"]


class SeriesState(str, enum.Enum):
    RECEIVING = "receiving"  # instances arriving; completes after the quiet period
    SELECTED = "selected"  # complete, eligible: a job was queued
    NOT_SELECTED = "not_selected"  # complete, not eligible (reason recorded)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"  # loading, inference, building
    DELIVERING = "delivering"  # output built; sending (or waiting to retry)
    # output built, not delivered: quality control held it (``dicomnode release`` sends it); no worker takes it
    HELD = "held"
    DONE = "done"
    FAILED = "failed"
    # a newer job covers it: the series grew before this job started, or a job of a later generation
    # of the series (same direction) finished; its synthetic series is replaced by that job's (error names it)
    SUPERSEDED = "superseded"


#: the states of a job that is not finished (stored as their values)
ACTIVE_JOB_STATES: tuple[str, ...] = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.DELIVERING.value)

#: the states of a job whose synthetic series has not reached its destinations yet and still may (active or held):
#: what retention and anything else that cleans up must leave alone
UNFINISHED_JOB_STATES: tuple[str, ...] = (*ACTIVE_JOB_STATES, JobState.HELD.value)

#: not a stored state: a delivering job whose last delivery attempt failed and whose next one is scheduled
RETRYING = "retrying"

#: what ``dicomnode status --state`` accepts: series states, job states and "retrying"
STATUS_FILTERS: tuple[str, ...] = tuple(dict.fromkeys([*(x.value for x in SeriesState),
                                                       *(x.value for x in JobState), RETRYING]))


class CompletionTrigger(str, enum.Enum):
    """Why a receiving series became due for completion."""

    QUIET = "quiet"  # no new instance for series.quiet_seconds
    RELEASE = "release"  # the association that carried it was released


class DeliveryOutcome(str, enum.Enum):
    """What one delivery attempt of a job (to every destination) came to."""

    DELIVERED = "delivered"  # every destination stored every instance: the job is done
    RETRY_LATER = "retry_later"  # only retryable failures, and the retry window is not spent
    FAILED = "failed"  # a permanent failure, or retries gave up


class QCAction(str, enum.Enum):
    """What the node does with a built series whose quality control did not pass (``[qc] on_warn``/``on_fail``)."""

    SEND = "send"  # deliver it (the verdict travels in ImageComments and the label)
    HOLD = "hold"  # keep it in state ``held`` until ``dicomnode release``
