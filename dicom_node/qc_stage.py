"""The worker's quality-control stage (between inference and building) and the policy for its verdict.

:class:`QCStage` runs :func:`ml.inference.assess` on the loaded volume (the input against the
checkpoint's training reference, and the flip disagreement on every ``[qc] flip_every``-th
slice), adds the checks of any *extra* callables ``(headers, direction) -> list[Check]`` (DICOM
header checks) and summarises them into one :class:`ml.qc.QCResult`.  :func:`holds` says
whether ``[qc] on_warn``/``on_fail`` keep a built series back from delivery.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

from pydicom.dataset import Dataset

from dicom_node.config import QCConfig
from ml.qc import Check, QCResult, Verdict, summarize
from vocab import Direction, QCAction

if TYPE_CHECKING:
    from dicom_node.worker import LoadedSeries, Synthesis
    from storage.ledger import ClaimedJob

__all__ = ["HeaderCheck", "QCStage", "holds"]

log = logging.getLogger(__name__)

#: an extra check on the source headers (e.g. contrast agent given); gets the series' headers and the job's direction
HeaderCheck = Callable[[Sequence[Dataset], Direction], list[Check]]


class QCStage:
    """Quality control of one synthesis (a :class:`dicom_node.worker.QualityCheck`)."""

    def __init__(self, cfg: QCConfig, *, batch_size: int = 16, extra: Sequence[HeaderCheck] = ()) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.extra = tuple(extra)

    def __call__(self, job: ClaimedJob, series: LoadedSeries, synthesis: Synthesis) -> QCResult:
        from ml.inference import assess

        vol = series.volume
        result = assess(synthesis.model, vol.nifti_order(), vol.affine_ras(), batch_size=self.batch_size,
                        every=self.cfg.flip_every, flip_warn=self.cfg.flip_warn, flip_fail=self.cfg.flip_fail)
        checks = list(result.checks)
        headers = [vol.header]  # a representative source header (without pixel data)
        for extra in self.extra:
            checks += _run_extra(extra, headers, Direction(job.direction))
        return summarize(checks)


def _run_extra(check: HeaderCheck, headers: Sequence[Dataset], direction: Direction) -> list[Check]:
    """The checks of *check*; one that raises is a warning that names it (the series is not trusted blindly)."""
    name = getattr(check, "__name__", type(check).__name__)
    try:
        return list(check(headers, direction))
    except Exception as exc:  # noqa: BLE001 - a broken check must not lose the job, nor pass silently
        log.warning("QC check %s could not run: %s: %s", name, type(exc).__name__, exc)
        return [Check(name, 0.0, "runs", Verdict.WARN, f"QC check {name} could not run ({type(exc).__name__})")]


def holds(cfg: QCConfig, verdict: Verdict) -> bool:
    """True when the policy keeps a series with this verdict back from delivery (state ``held``)."""
    action = {Verdict.WARN: cfg.on_warn, Verdict.FAIL: cfg.on_fail}.get(verdict, QCAction.SEND)
    return action is QCAction.HOLD
