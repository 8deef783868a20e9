"""load_series: one spooled series -> a sorted, geometry-checked float32 volume."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicomgen import SeriesSpec, make_series, phantom, write_series
from dicom_node.volume import SeriesError, SeriesVolume, decode_frame, load_series
from netutil import SHARED_DATA, needs_shared

OBLIQUE = tuple(
    round(v, 6)
    for v in (
        math.cos(0.3), math.sin(0.3), 0.0,
        -math.sin(0.3) * math.cos(0.2), math.cos(0.3) * math.cos(0.2), -math.sin(0.2),
    )
)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _write(tmp_path: Path, spec: SeriesSpec, name: str = "s") -> tuple[list[pydicom.Dataset], list[Path]]:
    dss = make_series(spec)
    return dss, write_series(dss, tmp_path / name)


def _check_affine(vol: SeriesVolume) -> None:
    """Voxel (i=col, j=row, k=slice) of nifti_order maps to each slice's IPP (in RAS)."""
    aff = vol.affine_ras()
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, sl in enumerate(vol.slices):
        ras = aff @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(ras[:3], sl.position * lps_to_ras, atol=1e-3)
    # one column step moves along row_dir by the column spacing
    step = aff @ np.array([1.0, 0, 0, 1]) - aff @ np.array([0.0, 0, 0, 1])
    np.testing.assert_allclose(step[:3], vol.row_dir * vol.pixel_spacing[1] * lps_to_ras, atol=1e-9)


def test_classic_series_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    spec = SeriesSpec(slices=10, rows=32, cols=48, pixel_spacing=0.8, slice_spacing=2.5, shuffle_instance_numbers=True)
    dss, paths = _write(tmp_path, spec)
    assert [int(d.InstanceNumber) for d in dss] != list(range(1, 11))  # really shuffled
    random.Random(1).shuffle(paths)
    vol = load_series(paths)
    assert vol.pixels.dtype == np.float32 and vol.pixels.shape == (10, 32, 48)
    # generated in ascending position order: volume equals the phantom slice by slice
    np.testing.assert_array_equal(vol.pixels, phantom((10, 32, 48), "T1").astype(np.float32))
    assert [s.sop_instance_uid for s in vol.slices] == [d.SOPInstanceUID for d in dss]
    assert all(s.frame_number is None for s in vol.slices)
    assert vol.slice_spacing == pytest.approx(2.5, abs=1e-4)
    assert vol.pixel_spacing == (0.8, 0.8)
    assert vol.slice_thickness == pytest.approx(2.5)
    np.testing.assert_allclose(vol.normal, [0, 0, 1])
    assert "PixelData" not in vol.header and vol.header.PatientID == "PHANTOM-001"
    _check_affine(vol)
    assert vol.nifti_order().shape == (48, 32, 10)
    np.testing.assert_array_equal(vol.from_nifti_order(vol.nifti_order()), vol.pixels)
    with pytest.raises(ValueError):
        vol.from_nifti_order(vol.pixels)


def test_descending_positions_are_sorted_ascending_along_normal(tmp_path: Path) -> None:
    # negative normal relative to acquisition order: reversed IOP column direction
    spec = SeriesSpec(slices=6, orientation=(1, 0, 0, 0, -1, 0))  # normal = -z
    dss, paths = _write(tmp_path, spec)
    vol = load_series(paths)
    d = [float(s.position @ vol.normal) for s in vol.slices]
    assert d == sorted(d)
    assert [s.sop_instance_uid for s in vol.slices] == [x.SOPInstanceUID for x in dss]
    _check_affine(vol)


@pytest.mark.parametrize("orientation", [SAGITTAL, OBLIQUE], ids=["sagittal", "oblique"])
def test_sagittal_and_oblique_geometry(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    spec = SeriesSpec(slices=8, rows=40, cols=36, pixel_spacing=1.2, slice_spacing=3.3, orientation=orientation)
    dss, paths = _write(tmp_path, spec)
    vol = load_series(list(reversed(paths)))
    np.testing.assert_allclose(vol.row_dir, orientation[:3], atol=1e-6)
    np.testing.assert_allclose(vol.col_dir, orientation[3:], atol=1e-6)
    assert vol.slice_spacing == pytest.approx(3.3, abs=1e-3)
    _check_affine(vol)


def test_rescale_slope_and_intercept_applied(tmp_path: Path) -> None:
    dss = make_series(SeriesSpec(slices=4))
    for ds in dss:
        ds.RescaleSlope = 0.5
        ds.RescaleIntercept = -100
    vol = load_series(write_series(dss, tmp_path))
    expected = phantom((4, 64, 64), "T1").astype(np.float32) * 0.5 - 100
    np.testing.assert_allclose(vol.pixels, expected)


def test_compressed_series_is_decoded(tmp_path: Path) -> None:
    dss = make_series(SeriesSpec(slices=4))
    for ds in dss:
        ds.compress(RLELossless)
    paths = write_series(dss, tmp_path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    vol = load_series(paths)
    np.testing.assert_array_equal(vol.pixels, phantom((4, 64, 64), "T1").astype(np.float32))


@needs_shared
def test_every_transfer_syntax_decodes_to_the_same_pixels() -> None:
    folder = SHARED_DATA / "dicom" / "dcm_qa_ts"
    files = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    assert len(files) >= 9
    reference = decode_frame(files[0])
    syntaxes = set()
    for f in files:
        syntaxes.add(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        np.testing.assert_array_equal(decode_frame(f), reference, err_msg=f.name)
        vol = load_series([f])  # one-slice "series" through the full loader
        assert vol.pixels.shape == (1, *reference.shape)
        np.testing.assert_array_equal(vol.pixels[0], reference.astype(np.float32))
    assert len(syntaxes) >= 7  # explicit/implicit/big endian, RLE, JPEG lossless, JPEG-LS, J2K


@needs_shared
def test_enhanced_mr_multiframe() -> None:
    f = next((SHARED_DATA / "dicom" / "dcm_qa_xa30").glob("5_*.dcm"))
    ds = pydicom.dcmread(f)
    n = int(ds.NumberOfFrames)
    vol = load_series([f])
    assert vol.pixels.shape == (n, int(ds.Rows), int(ds.Columns))
    assert {s.sop_instance_uid for s in vol.slices} == {ds.SOPInstanceUID}
    numbers = [s.frame_number for s in vol.slices]
    assert all(isinstance(x, int) for x in numbers)
    assert sorted(x for x in numbers if x is not None) == list(range(1, n + 1))
    assert vol.slice_spacing == pytest.approx(2.0, abs=1e-3)
    assert vol.pixel_spacing == (2.0, 2.0)
    # each slice holds the frame it names, with its own position
    frames = ds.pixel_array
    for k, sl in enumerate(vol.slices):
        assert sl.frame_number is not None
        fg = ds.PerFrameFunctionalGroupsSequence[sl.frame_number - 1]
        np.testing.assert_allclose(sl.position, [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_array_equal(vol.pixels[k], frames[sl.frame_number - 1].astype(np.float32))
    assert "PixelData" not in vol.header
    _check_affine(vol)


@needs_shared
def test_enhanced_multi_echo_stacks_rejected() -> None:
    f = SHARED_DATA / "dicom" / "dcm_qa_enh" / "Philips_IM_0027_fMAP.dcm"
    with pytest.raises(SeriesError, match="several stacks"):
        load_series([f])


# --------------------------------------------------------------------------
# rejections: each names the problem in one line
# --------------------------------------------------------------------------


def _reject(paths: list[Path], pattern: str) -> str:
    with pytest.raises(SeriesError, match=pattern) as info:
        load_series(paths)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_slice_is_irregular_spacing(tmp_path: Path) -> None:
    _, paths = _write(tmp_path, SeriesSpec(slices=8))
    del paths[3]
    _reject(paths, "irregular slice spacing")


def test_mixed_orientation_rejected(tmp_path: Path) -> None:
    dss = make_series(SeriesSpec(slices=6))
    dss[2].ImageOrientationPatient = [1, 0, 0, 0, math.cos(0.1), math.sin(0.1)]
    _reject(write_series(dss, tmp_path), "mixed orientations")


def test_two_stacks_same_positions_rejected(tmp_path: Path) -> None:
    a = make_series(SeriesSpec(slices=5, seed=1))
    b = make_series(SeriesSpec(slices=5, seed=2))
    for ds in b:  # second echo of the same series
        ds.SeriesInstanceUID = a[0].SeriesInstanceUID
        ds.StudyInstanceUID = a[0].StudyInstanceUID
    _reject(write_series(a + b, tmp_path), "several stacks in one series: 10 images at 5 distinct positions")


def test_mixed_matrix_rejected(tmp_path: Path) -> None:
    a = make_series(SeriesSpec(slices=3, rows=32, cols=32))
    b = make_series(SeriesSpec(slices=3, rows=64, cols=64))
    for i, ds in enumerate(b):
        ds.SeriesInstanceUID = a[0].SeriesInstanceUID
        ds.ImagePositionPatient = [0, 0, 100 + 3 * i]
    _reject(write_series(a + b, tmp_path), "mixed image sizes")


def test_files_from_two_series_rejected(tmp_path: Path) -> None:
    _, pa = _write(tmp_path, SeriesSpec(slices=3), "a")
    _, pb = _write(tmp_path, SeriesSpec(slices=3), "b")
    _reject(pa + pb, "different series")


def test_not_dicom_and_missing_geometry_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM")
    _reject([junk], "junk.dcm: cannot read DICOM header")
    dss = make_series(SeriesSpec(slices=3))
    del dss[1].ImagePositionPatient
    _reject(write_series(dss, tmp_path / "g"), "missing ImagePositionPatient")
    assert issubclass(SeriesError, ValueError)


def test_corrupt_pixel_data_rejected(tmp_path: Path) -> None:
    dss = make_series(SeriesSpec(slices=3))
    dss[1].PixelData = dss[1].PixelData[:100]
    paths = write_series(dss, tmp_path)
    msg = _reject(paths, "cannot decode pixel data")
    assert paths[1].name in msg


def test_same_instance_twice_is_counted_once(tmp_path: Path) -> None:
    dss, paths = _write(tmp_path, SeriesSpec(slices=4))
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(paths[0].read_bytes())
    assert load_series(paths + [copy]).pixels.shape[0] == 4



def test_legacy_converted_enhanced_multiframe_equals_its_classic_source(tmp_path: Path) -> None:
    """A Legacy Converted Enhanced MR (made by highdicom from a shuffled classic series) loads like the classic one."""
    import highdicom as hd

    dss = make_series(SeriesSpec(slices=6, rows=32, cols=40, slice_spacing=2.0))
    shuffled = dss[:]
    random.Random(3).shuffle(shuffled)
    frames = hd.legacy.LegacyConvertedEnhancedMRImage(
        shuffled, series_instance_uid=hd.UID(), series_number=10, sop_instance_uid=hd.UID(), instance_number=1)
    path = tmp_path / "legacy.dcm"
    frames.save_as(path, enforce_file_format=True)
    classic = load_series(write_series(dss, tmp_path / "classic"))
    vol = load_series([path])
    np.testing.assert_array_equal(vol.pixels, classic.pixels)
    for a, b in zip(vol.slices, classic.slices):
        np.testing.assert_allclose(a.position, b.position, atol=1e-4)
        assert a.sop_instance_uid == frames.SOPInstanceUID and a.frame_number is not None
    np.testing.assert_allclose(vol.affine_ras(), classic.affine_ras(), atol=1e-4)


def test_enhanced_pixel_value_transformation_shared_and_per_frame(tmp_path: Path) -> None:
    import highdicom as hd
    from pydicom.dataset import Dataset

    dss = make_series(SeriesSpec(slices=4, rows=16, cols=16))
    frames = hd.legacy.LegacyConvertedEnhancedMRImage(
        dss, series_instance_uid=hd.UID(), series_number=10, sop_instance_uid=hd.UID(), instance_number=1)
    shared = frames.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    shared.RescaleSlope, shared.RescaleIntercept = 2, 5
    override = Dataset()
    override.RescaleSlope, override.RescaleIntercept, override.RescaleType = 3, 0, "US"
    frames.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [override]
    path = tmp_path / "pvt.dcm"
    frames.save_as(path, enforce_file_format=True)
    vol = load_series([path])
    stored = {s.frame_number: k for k, s in enumerate(vol.slices)}
    raw = frames.pixel_array.astype(np.float32)
    for frame_number, k in stored.items():
        assert frame_number is not None
        factor, offset = (3.0, 0.0) if frame_number == 2 else (2.0, 5.0)
        np.testing.assert_allclose(vol.pixels[k], raw[frame_number - 1] * factor + offset)
