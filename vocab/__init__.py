"""The shared vocabulary of dicomnode: the words the node, the ledger and ``ml/`` all use.

This package imports nothing from the node, the ledger or the models, so
every one of them (``ml/`` included) can import it.
"""

from vocab.contrast import DIRECTIONS, Classification, Direction
from vocab.dimse import StoreStatus
from vocab.states import (ACTIVE_JOB_STATES, RETRYING, STATUS_FILTERS, UNFINISHED_JOB_STATES, CompletionTrigger,
                          DeliveryOutcome, JobState, QCAction, SeriesState)

__all__ = [
    "ACTIVE_JOB_STATES",
    "Classification",
    "CompletionTrigger",
    "DIRECTIONS",
    "DeliveryOutcome",
    "Direction",
    "JobState",
    "QCAction",
    "RETRYING",
    "STATUS_FILTERS",
    "SeriesState",
    "StoreStatus",
    "UNFINISHED_JOB_STATES",
]
