"""The worker's QC stage: assess() on the loaded series plus extra header checks, and the hold/send policy."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom import Dataset

from dicom_node.build import Revision
from dicom_node.config import QCConfig
from dicom_node.qc_stage import HeaderCheck, QCStage, holds
from dicom_node.volume import load_series
from dicom_node.worker import LoadedSeries, Synthesis
from dicomgen import SeriesSpec, make_series, write_series
from ml.inference import load_model
from ml.qc import Check, QCResult, Verdict
from storage.ledger import ClaimedJob, utcnow
from test_ml_units import _tiny_checkpoint
from vocab import Direction, JobState, QCAction


def _run(tmp_path: Path, extra: Sequence[HeaderCheck]) -> QCResult:
    vol = load_series(write_series(make_series(SeriesSpec(slices=6, rows=40, cols=40)), tmp_path / "src"))
    model = load_model(_tiny_checkpoint(tmp_path / "ck"), device="cpu")
    job = ClaimedJob(1, 1, str(vol.header.SeriesInstanceUID), 1, Direction.T1_TO_T2, JobState.RUNNING, None, None, 0, 1,
                     utcnow(), {})
    stage = QCStage(QCConfig(flip_every=2), extra=extra)
    return stage(job, LoadedSeries(vol, Revision()), Synthesis(model, np.zeros(vol.shape, np.uint16)))


def test_extra_header_checks_join_the_verdict_and_a_broken_one_warns(tmp_path: Path) -> None:
    calls: list[tuple[int, Direction]] = []

    def contrast_agent(headers: Sequence[Dataset], direction: Direction) -> list[Check]:
        calls.append((len(headers), direction))
        assert headers[0].Modality == "MR"
        return [Check("contrast_agent", 1.0, "absent", Verdict.FAIL, "contrast agent given (ContrastBolusAgent)")]

    def broken(headers: Sequence[Dataset], direction: Direction) -> list[Check]:
        raise KeyError("InversionTime")

    result = _run(tmp_path, [contrast_agent, broken])
    assert calls == [(1, Direction.T1_TO_T2)]
    d = result.to_dict()
    assert d["verdict"] == "fail" and "contrast agent given (ContrastBolusAgent)" in d["reasons"]
    assert d["checks"]["broken"]["verdict"] == "warn" and "QC check broken could not run (KeyError)" in d["reasons"]
    assert "flip_disagreement" in d["checks"]  # assess() ran on the loaded volume


def test_the_policy_holds_what_config_says() -> None:
    default = QCConfig()
    assert not holds(default, Verdict.PASS) and not holds(default, Verdict.WARN) and holds(default, Verdict.FAIL)
    strict = QCConfig(on_warn=QCAction.HOLD, on_fail=QCAction.HOLD)
    assert holds(strict, Verdict.WARN) and not holds(strict, Verdict.PASS)
    assert not holds(QCConfig(on_fail=QCAction.SEND), Verdict.FAIL)
