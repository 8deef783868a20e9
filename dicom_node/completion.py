"""Series completion: a series is complete after ``series.quiet_seconds``
without new instances, or shortly after the association that carried it was
released.  Complete series are classified and, when selected, queued as jobs.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from dicom_node.config import Config
from vocab import Classification, Direction
from dicom_node.selection import Decision, classify
from storage.ledger import DueSeries, Ledger, utcnow

log = logging.getLogger(__name__)


def decide(ledger: Ledger, cfg: Config, due: DueSeries) -> tuple[Decision, Direction | None]:
    decision = classify(ledger.series_attrs(due.id), cfg.series)
    if not decision.selected:
        return decision, None
    direction = Direction.for_source(decision.classification)
    if direction not in cfg.model.directions:
        return Decision(Classification.NOT_ELIGIBLE,
                        f"{decision.classification.value} series, but {direction.value} is not in model.directions"), None
    return decision, direction


def complete_due(ledger: Ledger, cfg: Config, now: datetime | None = None) -> int:
    """Hand on every series that is due; returns how many were handed on."""
    grace = cfg.series.release_grace_seconds if cfg.series.complete_on_release else None
    n = 0
    for due in ledger.due_series(cfg.series.quiet_seconds, grace, now):
        decision, direction = decide(ledger, cfg, due)
        outcome = ledger.complete_series(
            due,
            classification=decision.classification.value,
            reason=decision.reason,
            direction=direction.value if direction else None,
            now=now,
        )
        if outcome is False:
            continue  # grew meanwhile; it will be due again later
        n += 1
        waited = (utcnow() - due.last_received_at).total_seconds()
        if outcome is None:
            log.info("series %s complete (%s, %d instances, from %s): not selected: %s",
                     due.series_uid, due.trigger.value, due.instances, due.calling_aet, decision.reason)
        else:
            log.info("series %s complete (%s after %.1f s, %d instances, from %s): %s (%s), job %d queued (%s)",
                     due.series_uid, due.trigger.value, waited, due.instances, due.calling_aet,
                     decision.classification.value, decision.reason, outcome, direction.value if direction else "")
    return n


class CompletionMonitor(threading.Thread):
    def __init__(self, ledger: Ledger, cfg: Config, interval: float = 0.25) -> None:
        super().__init__(name="completion", daemon=True)
        self.ledger = ledger
        self.cfg = cfg
        self.interval = interval
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            try:
                complete_due(self.ledger, self.cfg)
            except Exception:
                log.exception("series completion check failed; will retry")

    def stop(self) -> None:
        self._stop_evt.set()
