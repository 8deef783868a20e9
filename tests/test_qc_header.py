"""dicom_node.qc_header: header facts that change the contrast are named in a check with a verdict.

Specification: a plain axial T1 or T2 series at 3 T passes every header check; contrast agent (any of the classic
tags or the Enhanced MR usage sequence) warns; a FLAIR-like inversion time fails while a T1 inversion (MPRAGE)
passes; a field strength outside 1-3.5 T warns and an unstated one gives no verdict; thick slices off axial warn.
Reasons name the cause and never the patient.
"""

from __future__ import annotations

from typing import Callable

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.qc_header import header_checks
from ml.qc import Check, Verdict, summarize
from vocab import Direction

from dicomgen import SeriesSpec, make_series
from netutil import SHARED_DATA, needs_shared

T1, T2 = Direction.T1_TO_T2, Direction.T2_TO_T1
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def _series(weighting: str = "T1", mutate: Callable[[Dataset], None] | None = None, **spec: object) -> list[Dataset]:
    datasets = make_series(SeriesSpec(weighting=weighting, slices=4, rows=8, cols=8, **spec))  # type: ignore[arg-type]
    for ds in datasets:
        if mutate is not None:
            mutate(ds)
    return datasets


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_plain_axial_series_at_3_tesla_passes_every_header_check() -> None:
    for weighting, direction in (("T1", T1), ("T2", T2)):
        checks = header_checks(_series(weighting), direction)
        assert summarize(checks).verdict is Verdict.PASS
        assert set(_by_name(checks)) == {"contrast_agent", "field_strength", "slice_geometry"}
        assert all(c.threshold for c in checks)
    assert header_checks([], T1) == []


@pytest.mark.parametrize("keyword,value", [("ContrastBolusAgent", "Gadobutrol"), ("ContrastBolusRoute", "IV"),
                                           ("ContrastBolusVolume", 7.5), ("ContrastBolusStartTime", "101500"),
                                           ("ContrastBolusTotalDose", 7.5)])
def test_a_contrast_tag_warns_and_names_the_tag(keyword: str, value: object) -> None:
    def given(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    check = _by_name(header_checks(_series("T1", given), T1))["contrast_agent"]
    assert check.verdict is Verdict.WARN and check.value == 1.0
    assert keyword in check.reason and "T1 model was trained on images without contrast agent" in check.reason
    assert "Phantom" not in check.reason and "PHANTOM-001" not in check.reason  # no patient data


def test_empty_or_none_contrast_tags_are_no_contrast() -> None:
    def empty(ds: Dataset) -> None:
        ds.ContrastBolusAgent = ""
        ds.ContrastBolusRoute = "NONE"
        ds.ContrastBolusVolume = 0

    assert _by_name(header_checks(_series("T1", empty), T1))["contrast_agent"].verdict is Verdict.PASS


def test_contrast_agent_sequence_warns() -> None:
    def agent(ds: Dataset) -> None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "C-B0322", "SRT", "Gadolinium"
        ds.ContrastBolusAgentSequence = [item]

    check = _by_name(header_checks(_series("T1", agent), T1))["contrast_agent"]
    assert check.verdict is Verdict.WARN and "ContrastBolusAgentSequence" in check.reason


def _enhanced(administered: str | None = None, ir: str | None = None, inversion_times: list[float] | None = None,
              orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), thickness: float = 1.0) -> Dataset:
    """An Enhanced MR header: contrast, inversion and geometry only in the functional groups."""
    shared, frame = Dataset(), Dataset()
    if administered is not None:
        usage = Dataset()
        usage.ContrastBolusAgentNumber = 1
        usage.ContrastBolusAgentAdministered = administered
        shared.ContrastBolusUsageSequence = [usage]
    if ir is not None:
        modifier = Dataset()
        modifier.InversionRecovery = ir
        if inversion_times is not None:
            modifier.InversionTimes = inversion_times
        shared.MRModifierSequence = [modifier]
    plane, measures = Dataset(), Dataset()
    plane.ImageOrientationPatient = list(orientation)
    measures.SliceThickness = thickness
    measures.PixelSpacing = [1.0, 1.0]
    frame.PlaneOrientationSequence = [plane]
    frame.PixelMeasuresSequence = [measures]
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.MagneticFieldStrength = 3
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [frame]
    return ds


def test_enhanced_mr_contrast_usage_sequence_is_read() -> None:
    assert _by_name(header_checks([_enhanced("YES")], T1))["contrast_agent"].verdict is Verdict.WARN
    assert "agent administered" in _by_name(header_checks([_enhanced("YES")], T1))["contrast_agent"].reason
    assert _by_name(header_checks([_enhanced("NO")], T1))["contrast_agent"].verdict is Verdict.PASS


def test_a_flair_like_inversion_time_fails_and_a_t1_inversion_passes() -> None:
    def flair(ds: Dataset) -> None:
        ds.ScanningSequence = ["SE", "IR"]
        ds.InversionTime = 2500

    check = _by_name(header_checks(_series("T2", flair), T2))["inversion_recovery"]
    assert check.verdict is Verdict.FAIL and check.value == 2500
    assert "FLAIR-like" in check.reason and "not a T2 contrast" in check.reason

    def mprage(ds: Dataset) -> None:
        ds.ScanningSequence = ["GR", "IR"]
        ds.InversionTime = 900

    assert _by_name(header_checks(_series("T1", mprage), T1))["inversion_recovery"].verdict is Verdict.PASS
    enhanced = _by_name(header_checks([_enhanced(ir="YES", inversion_times=[2400.0])], T2))["inversion_recovery"]
    assert enhanced.verdict is Verdict.FAIL and enhanced.value == 2400.0


def test_inversion_recovery_without_an_inversion_time_warns_and_none_stated_gives_no_check() -> None:
    def ir(ds: Dataset) -> None:
        ds.ScanningSequence = ["IR"]

    check = _by_name(header_checks(_series("T2", ir), T2))["inversion_recovery"]
    assert check.verdict is Verdict.WARN and "without a stated inversion time" in check.reason
    assert "inversion_recovery" not in _by_name(header_checks(_series("T2"), T2))


@pytest.mark.parametrize("tesla,verdict", [(0.5, Verdict.WARN), (1.5, Verdict.PASS), (3.0, Verdict.PASS),
                                           (7.0, Verdict.WARN)])
def test_field_strength_outside_the_training_range_warns(tesla: float, verdict: Verdict) -> None:
    def field(ds: Dataset) -> None:
        ds.MagneticFieldStrength = tesla

    check = _by_name(header_checks(_series("T1", field), T1))["field_strength"]
    assert check.verdict is verdict and check.value == tesla
    if verdict is Verdict.WARN:
        assert f"field strength {tesla:g} T" in check.reason


def test_an_unstated_field_strength_gives_no_verdict() -> None:
    def unstated(ds: Dataset) -> None:
        del ds.MagneticFieldStrength

    assert "field_strength" not in _by_name(header_checks(_series("T1", unstated), T1))


@pytest.mark.parametrize("orientation,spacing,verdict,plane", [
    (SAGITTAL, 5.0, Verdict.WARN, "sagittal"), (CORONAL, 4.0, Verdict.WARN, "coronal"),
    (SAGITTAL, 1.0, Verdict.PASS, ""), ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 5.0, Verdict.PASS, "")])
def test_thick_slices_off_axial_warn(orientation: tuple[float, ...], spacing: float, verdict: Verdict,
                                     plane: str) -> None:
    check = _by_name(header_checks(_series("T1", orientation=orientation, slice_spacing=spacing), T1))["slice_geometry"]
    assert check.verdict is verdict
    assert plane in check.reason


def test_slice_spacing_comes_from_the_positions_when_no_thickness_is_stated() -> None:
    def unstated(ds: Dataset) -> None:
        del ds.SliceThickness, ds.SpacingBetweenSlices

    check = _by_name(header_checks(_series("T1", unstated, orientation=SAGITTAL, slice_spacing=5.0), T1))
    assert check["slice_geometry"].verdict is Verdict.WARN and "of 5 mm" in check["slice_geometry"].reason


def test_enhanced_mr_geometry_comes_from_the_functional_groups() -> None:
    check = _by_name(header_checks([_enhanced(orientation=SAGITTAL, thickness=5.0)], T1))["slice_geometry"]
    assert check.verdict is Verdict.WARN and check.value == pytest.approx(90.0)


@needs_shared
def test_a_real_siemens_mprage_like_t1_passes_the_header_checks() -> None:
    """Siemens XA30 T1w tfl (neurolabusc dcm_qa_xa30, BSD-2): inversion recovery at TI 900 ms, sagittal 2 mm, 3 T."""
    f = next((SHARED_DATA / "dicom" / "dcm_qa_xa30").glob("5_*.dcm"))
    checks = _by_name(header_checks([pydicom.dcmread(f, stop_before_pixels=True)], T1))
    assert checks["inversion_recovery"].value == 900.0 and checks["inversion_recovery"].verdict is Verdict.PASS
    assert checks["slice_geometry"].verdict is Verdict.PASS  # sagittal, but 2 mm
    assert summarize(list(checks.values())).verdict is Verdict.PASS
