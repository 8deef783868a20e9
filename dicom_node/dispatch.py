"""The delivery policy of a job: send its built output to every destination that takes its direction,
only what each has not confirmed yet, and decide what comes next (done, retry later, or failed).

The worker times the sending and applies the verdict to the ledger; the
retry schedule itself is :class:`dicom_node.retry.RetryPolicy`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_node.config import Config, Destination
from dicom_node.retry import RetryPolicy
from storage.ledger import ClaimedJob, Ledger
from storage.outputs import BuiltOutput
from vocab import DeliveryOutcome, Direction

if TYPE_CHECKING:
    from dicom_node.net.scu import DeliveryResult

__all__ = ["Dispatcher", "SendReport", "Verdict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendReport:
    """One delivery attempt: per destination, a line for each that did not store everything."""

    retryable: list[str]
    permanent: list[str]


@dataclass(frozen=True)
class Verdict:
    outcome: DeliveryOutcome
    reason: str = ""  # what failed (FAILED, RETRY_LATER)
    attempts: int = 0  # failed delivery attempts so far (RETRY_LATER, or FAILED after giving up)
    delay_seconds: float = 0.0  # RETRY_LATER: when to try again


class Dispatcher:
    def __init__(self, cfg: Config, ledger: Ledger) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.policy = RetryPolicy.from_config(cfg.delivery)
        self.calling_ae_title = cfg.delivery.calling_ae_title or cfg.node.ae_title

    def destinations_for(self, direction: Direction) -> list[Destination]:
        return [d for d in self.cfg.destinations if direction in d.directions]

    def send(self, job: ClaimedJob, built: BuiltOutput, destinations: list[Destination]) -> SendReport:
        """Send to each destination what it has not confirmed yet (a retry never sends a stored instance again)."""
        from dicom_node.net.scu import deliver  # pynetdicom: loaded by the first delivery, not by every worker start

        files = built.files
        report = SendReport([], [])
        for dest in destinations:
            stored = self.ledger.stored_instances(job.id, dest.label)
            todo = [f for f, uid in zip(files, built.sop_instance_uids) if uid not in stored]
            if not todo:
                continue
            if stored:
                log.info("job %d: %d of %d instance(s) already stored at %s; sending the other %d", job.id,
                         len(files) - len(todo), len(files), dest.label, len(todo))
            res = deliver(todo, dest, calling_ae_title=self.calling_ae_title,
                          timeout=self.cfg.delivery.timeout_seconds)
            self.ledger.record_deliveries(
                job.id, dest.label, [(o.sop_instance_uid, o.status, o.stored, o.detail) for o in res.outcomes]
            )
            if not res.ok:
                (report.retryable if res.retryable else report.permanent).append(_failure(dest, res, len(files)))
        return report

    def decide(self, job: ClaimedJob, report: SendReport) -> Verdict:
        if report.permanent:
            return Verdict(DeliveryOutcome.FAILED, "delivery failed: " + "; ".join(report.permanent + report.retryable))
        if not report.retryable:
            return Verdict(DeliveryOutcome.DELIVERED)
        j = self.ledger.job(job.id)
        attempts = (j.attempts if j else job.attempts) + 1
        reason = "; ".join(report.retryable)
        if self.policy.gives_up(attempts):
            return Verdict(DeliveryOutcome.FAILED, f"delivery gave up after {attempts} attempts over "
                           f"{self.policy.waited(attempts) / 3600:.2f} h: " + reason, attempts)
        return Verdict(DeliveryOutcome.RETRY_LATER, reason, attempts, self.policy.delay(attempts))


def _failure(dest: Destination, res: DeliveryResult, total: int) -> str:
    failed = [o for o in res.outcomes if not o.stored]
    first = res.error or (f"0x{failed[0].status:04X} {failed[0].detail}" if failed and failed[0].status is not None
                          else (failed[0].detail if failed else "unknown"))
    return f"{dest.label}: {len(failed)}/{total} not stored ({first})"
