"""Series selection with the shipped default rules, on typical vendor series."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.config import Classification, SeriesConfig
from dicom_node.selection import classify, facts
from dicomgen import SeriesSpec, make_series

MR = "1.2.840.10008.5.1.4.1.1.4"
CFG = SeriesConfig()


def series(n: int = 20, **f: Any) -> list[dict[str, Any]]:
    base = {"sop_class_uid": MR, "modality": "MR", "image_type": ["ORIGINAL", "PRIMARY", "M", "ND"],
            "description": "", "protocol": "", "tr": None, "te": None, "ti": None, "scanning_sequence": [],
            "rows": 256, "cols": 256, "frames": 1, "iop": [1, 0, 0, 0, 1, 0], "spacing": [1, 1],
            "synthetic": False, "ours": False}
    base.update(f)
    return [dict(base) for _ in range(n)]


@pytest.mark.parametrize(
    ("vendor_series", "expected"),
    [
        # Siemens
        (series(description="t1_mprage_sag_p2_iso", tr=2300, te=2.98, ti=900, scanning_sequence=["GR", "IR"]), "T1"),
        (series(description="t1_se_tra", tr=550, te=12, scanning_sequence=["SE"]), "T1"),
        (series(description="t2_tse_tra_p2", tr=6000, te=95, scanning_sequence=["SE"]), "T2"),
        (series(description="t2_tirm_tra_dark-fluid", tr=9000, te=81, ti=2500, scanning_sequence=["SE", "IR"]), None),
        (series(description="ep2d_diff_3scan_trace", tr=4000, te=89, scanning_sequence=["EP"]), None),
        # GE
        (series(description="Ax T1 FSPGR BRAVO", tr=8.2, te=3.2, scanning_sequence=["GR"]), "T1"),
        (series(description="AX T2 FSE", tr=4500, te=102, scanning_sequence=["SE"]), "T2"),
        (series(description="AX T2 PROPELLER", tr=5000, te=110, scanning_sequence=["SE"]), "T2"),
        (series(description="AX T2 FLAIR", tr=9000, te=120, scanning_sequence=["SE", "IR"]), None),
        # Philips
        (series(description="T1W_3D_TFE", tr=8.1, te=3.7, scanning_sequence=["GR"]), "T1"),
        (series(description="T2W_TSE", tr=3000, te=80, scanning_sequence=["SE"]), "T2"),
        (series(description="sT2W_FLAIR", tr=4800, te=340, scanning_sequence=["SE", "IR"]), None),
        # no helpful name: parameters decide
        (series(description="AXIAL 5", tr=500, te=10, scanning_sequence=["SE"]), "T1"),
        (series(description="AXIAL 6", tr=4000, te=100, scanning_sequence=["SE"]), "T2"),
        (series(description="AXIAL 7", tr=30, te=5, scanning_sequence=["GR"]), None),
        # T2* is not T2
        (series(description="t2_swi_tra", tr=28, te=20, scanning_sequence=["GR"]), None),
        # "_" separates words; letters or digits around T1/T2 do not make a T1/T2
        (series(description="ax_t1_se", tr=500, te=10, scanning_sequence=["SE"]), "T1"),
        (series(description="sT1W_3D_TFE", tr=8, te=3.5, scanning_sequence=["GR"]), "T1"),
        (series(description="ep2d_dwi_b1000", tr=5000, te=90, scanning_sequence=["SE"]), None),
        (series(description="REST1 w SMS", tr=500, te=30, scanning_sequence=["GR", "EP"]), None),
        (series(description="PD_TSE_tra", tr=3000, te=30, scanning_sequence=["SE"]), None),
        (series(description="t2_fl2d_tra_hemo", tr=650, te=20, scanning_sequence=["GR"]), None),
    ],
)
def test_default_rules(vendor_series: list[dict[str, Any]], expected: str | None) -> None:
    d = classify(vendor_series, CFG)
    if expected is None:
        assert d.classification is Classification.NOT_ELIGIBLE and d.reason
    else:
        assert d.classification.value == expected, d.reason


def test_eligibility_checks_come_before_rules() -> None:
    t1 = dict(description="t1_se_tra", tr=550, te=12, scanning_sequence=["SE"])
    cases = {
        "DERIVED": series(image_type=["DERIVED", "SECONDARY"], **t1),
        "Synthetic Data": series(synthetic=True, **t1),
        "dicomnode": series(ours=True, **t1),
        "localizer": series(image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], **t1),
        "only 3 slices": series(3, **t1),
        "not an MR": series(sop_class_uid="1.2.840.10008.5.1.4.1.1.7", **t1),
    }
    for fragment, s in cases.items():
        d = classify(s, CFG)
        assert not d.selected and fragment in d.reason, (fragment, d.reason)
    mixed = series(10, **t1) + series(10, iop=[0, 1, 0, 0, 0, -1], **t1)
    assert "more than one geometry" in classify(mixed, CFG).reason


def test_facts_from_a_real_dataset_hold_no_patient_data() -> None:
    ds = make_series(SeriesSpec(weighting="T2", slices=1))[0]
    f = facts(ds)
    assert f["tr"] == 4000.0 and f["te"] == 95.0 and f["scanning_sequence"] == ["SE"]
    assert f["iop"] == [1, 0, 0, 0, 1, 0] and f["rows"] == 64
    text = repr(f)
    assert "Phantom" not in text and "PHANTOM-001" not in text and "19700101" not in text


def test_enhanced_mr_facts_come_from_functional_groups() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.NumberOfFrames = 30
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.EchoPulseSequence = "GRADIENT"
    shared = Dataset()
    timing = Dataset()
    timing.RepetitionTime = 2300
    shared.MRTimingAndRelatedParametersSequence = [timing]
    echo = Dataset()
    echo.EffectiveEchoTime = 2.9
    shared.MREchoSequence = [echo]
    orient = Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared.PlaneOrientationSequence = [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    f = facts(ds)
    assert (f["tr"], f["te"], f["frames"], f["scanning_sequence"]) == (2300.0, 2.9, 30, ["GR"])
    assert f["iop"] == [0, 1, 0, 0, 0, -1]


def test_our_own_synthetic_output_is_recognised(tmp_path) -> None:
    import numpy as np

    from dicom_node.build import ModelIdentity, build_synthetic_series
    from dicom_node.config import Direction, OutputConfig
    from dicom_node.volume import load_series
    from dicomgen import write_series

    vol = load_series(write_series(make_series(SeriesSpec(slices=10)), tmp_path / "src"))
    out = build_synthetic_series(vol, np.zeros(vol.pixels.shape, np.uint16), direction=Direction.T1_TO_T2,
                                 model=ModelIdentity("m", "1", "m-1"), output=OutputConfig(synthetic_data_flag=False),
                                 node_ae_title="DICOMNODE")
    f = [dict(facts(ds), sop_class_uid=str(ds.SOPClassUID)) for ds in out]
    assert all(x["ours"] for x in f)
    d = classify(f, CFG)
    assert not d.selected and "dicomnode" in d.reason


def test_real_vendor_series_from_shared_data() -> None:
    """Siemens classic EPI, Enhanced MR fMRI and field map, XA30 T1w tfl (neurolabusc dcm_qa, BSD-2)."""
    from collections import defaultdict

    from pydicom import dcmread

    from netutil import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    names: dict[str, str] = {}
    for p in sorted((SHARED_DATA / "dicom").rglob("*")):
        if p.is_file() and p.suffix != ".md" and p.name != "LICENSE":
            ds = dcmread(p, defer_size=4096)
            by_series[ds.SeriesInstanceUID].append(dict(facts(ds), sop_class_uid=str(ds.SOPClassUID)))
            names[ds.SeriesInstanceUID] = str(ds.SeriesDescription)
    cfg = SeriesConfig(min_slices=1)
    got = {names[uid]: classify(insts, cfg).classification.value for uid, insts in by_series.items()}
    assert got["anat-T1w_acq-tfl"] == "T1"
    assert got["REST1 w SMS PF7-8"] == "not_eligible"  # Enhanced MR echo-planar fMRI
    assert got["B0 NS"] == "not_eligible"  # field map
    assert got["ax_asc_35sl"] == "not_eligible"  # classic EPI
