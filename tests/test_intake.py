"""Intake of one received file: its header is read in every encoding, facts are cached per
series header, free space is checked, and bad files are named as malformed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node import selection
from dicom_node.intake import Malformed, _uid, read_header, validate
from dicomgen import SeriesSpec, make_series
from netutil import SHARED_DATA
from storage.spool import Spool, SpoolFull

ENCODINGS = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def write_as(ds: Dataset, ts: UID, path: Path) -> Path:
    """Write *ds* in transfer syntax *ts*, with a file meta group as pynetdicom writes it."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = ts
    if ts == ExplicitVRBigEndian:  # pydicom writes element values in the data set's own byte order
        ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("ts", ENCODINGS, ids=lambda u: u.name)
def test_the_header_reads_the_same_as_dcmread_in_every_encoding(ts: UID, tmp_path: Path) -> None:
    src = make_series(SeriesSpec(weighting="T2", slices=1))[0]
    path = write_as(src, ts, tmp_path / "x.dcm")
    ds = read_header(path, ts)
    full = dcmread(path)
    for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E):
        assert _uid(ds, tag) == str(full[tag].value)
    f = selection.facts(ds)
    assert f == selection._facts(full)
    assert (f["rows"], f["cols"], f["bits"], f["samples"], f["te"]) == (64, 64, 16, 1, 95.0)
    study, series = validate(ds, path.stat().st_size, str(full.SOPClassUID), str(full.SOPInstanceUID), ts, f)
    assert (study, series) == (full.StudyInstanceUID, full.SeriesInstanceUID)


def test_a_file_without_a_file_meta_group_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "raw.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\x04\x001.2\0")
    with pytest.raises(Malformed, match="cannot parse"):
        read_header(path, ExplicitVRLittleEndian)


def test_a_truncated_pixel_data_element_is_malformed(tmp_path: Path) -> None:
    src = make_series(SeriesSpec(slices=1))[0]
    path = write_as(src, ExplicitVRLittleEndian, tmp_path / "x.dcm")
    path.write_bytes(path.read_bytes()[:-100])
    ds = read_header(path, ExplicitVRLittleEndian)
    with pytest.raises(Malformed, match="truncated"):
        validate(ds, path.stat().st_size, str(src.SOPClassUID), str(src.SOPInstanceUID), ExplicitVRLittleEndian,
                 selection.facts(ds))


class _Recording(Dataset):
    """A data set that notes which top-level tags are looked at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "seen", set())

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            self.seen.add(int(key))
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        from pydicom.tag import Tag

        try:
            self.seen.add(int(Tag(key)))
        except Exception:
            pass
        return super().__contains__(key)


def _classic_datasets() -> list[Dataset]:
    out = make_series(SeriesSpec(weighting="T1", slices=1)) + make_series(SeriesSpec(weighting="T2", slices=1))
    vendor = SHARED_DATA / "dicom"
    if vendor.is_dir():
        for p in sorted(vendor.rglob("*"))[:400]:
            if p.is_file():
                try:
                    ds = dcmread(p, stop_before_pixels=True)
                except Exception:
                    continue
                if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
                    out.append(ds)
    return out


def test_facts_of_a_classic_data_set_depend_only_on_the_elements_of_the_cache_key() -> None:
    """If _facts ever reads another element, the per-series cache could hand out wrong facts."""
    allowed = set(selection._FACT_TAGS) | set(selection._FUNCTIONAL_GROUPS)
    for ds in _classic_datasets():
        rec = _Recording(ds)
        selection._facts(rec)
        assert rec.seen, "nothing recorded"
        assert rec.seen <= allowed, sorted(f"{t:08X}" for t in rec.seen - allowed)


def test_cached_facts_are_each_instances_own(tmp_path: Path) -> None:
    t1 = make_series(SeriesSpec(weighting="T1", slices=2))
    t2 = make_series(SeriesSpec(weighting="T2", slices=1))
    odd = copy.deepcopy(t1[1])
    odd.EchoTime = 33
    paths = [write_as(ds, ExplicitVRLittleEndian, tmp_path / f"{i}.dcm") for i, ds in enumerate([*t1, *t2, odd])]
    got = [selection.facts(read_header(p, ExplicitVRLittleEndian)) for p in paths]
    assert got == [selection._facts(dcmread(p)) for p in paths]
    assert got[0] == got[1] and got[2]["te"] == 95.0 and got[3]["te"] == 33.0
    got[0]["image_type"].append("CHANGED")  # a caller's copy: the cache keeps its own
    assert "CHANGED" not in selection.facts(read_header(paths[1], ExplicitVRLittleEndian))["image_type"]


class _ScriptedDisk(Spool):
    """A spool whose file system reports the free space a test sets."""

    free = 0
    queries = 0

    def free_bytes(self) -> int:
        self.queries += 1
        return self.free


def test_free_space_is_queried_again_unless_far_above_the_floor(tmp_path: Path) -> None:
    spool = _ScriptedDisk(tmp_path / "spool", min_free_mb=100)
    spool.free = 100 * 2**30  # far above the floor: one query covers the next second
    spool.check_space()
    spool.check_space()
    assert spool.queries == 1
    spool = _ScriptedDisk(tmp_path / "spool2", min_free_mb=100)
    spool.free = 600 * 2**20  # near the floor: every instance asks again
    spool.check_space()
    spool.check_space()
    assert spool.queries == 2
    spool.free = 50 * 2**20
    with pytest.raises(SpoolFull, match="below storage.min_free_mb=100"):
        spool.check_space()


def test_early_writeback_leaves_the_file_intact(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    tmp = spool.incoming / "x.part"
    data = bytes(range(256)) * 600
    tmp.write_bytes(data)
    spool.start_writeback(tmp)
    spool.start_writeback(tmp_path / "missing.part")  # a hint only: never raises
    done = spool.commit(tmp, "1.2", "1.2.3", "1.2.3.4")
    assert done.path.read_bytes() == data and done.size == len(data)


def test_enhanced_mr_functional_groups_larger_than_the_deferral_limit_are_read(tmp_path: Path) -> None:
    """Large sequences are deferred while the header is read; facts must still reach into them."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    frames = 120
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.ImageType = "MR", ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, 8, 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    pixels, shared = Dataset(), Dataset()
    pixels.PixelSpacing = [0.9, 0.9]
    shared.PixelMeasuresSequence = [pixels]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(frames):  # orientation per frame, as Siemens XA writes it
        pos, orient, item = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, float(i)]
        orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        item.PlanePositionSequence, item.PlaneOrientationSequence = [pos], [orient]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((frames, 8, 8), np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    for seq in (ds["SharedFunctionalGroupsSequence"], ds["PerFrameFunctionalGroupsSequence"]):
        seq.is_undefined_length = False  # with explicit lengths, as scanners write them: deferred when large
    path = write_as(ds, ExplicitVRLittleEndian, tmp_path / "enh.dcm")
    assert dcmread(path, defer_size=4096).get_item(0x52009230, keep_deferred=True).value is None  # deferred

    header = read_header(path, ExplicitVRLittleEndian)
    f = selection.facts(header)
    assert (f["frames"], f["iop"], f["spacing"]) == (frames, [1, 0, 0, 0, 1, 0], [0.9, 0.9])
    validate(header, path.stat().st_size, ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, f)


def _arrived(spool: Spool, ds: Dataset, name: str) -> Path:
    """*ds* as pynetdicom leaves a received data set: a file in the spool's incoming folder."""
    path = spool.incoming / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("overwrite", [False, True], ids=["refuse", "overwrite"])
def test_two_associations_storing_one_uid_with_different_content_at_once_keep_one_content(
        tmp_path: Path, overwrite: bool) -> None:
    import threading

    import numpy as np

    from dicom_node.intake import Intake
    from storage.ledger import Ledger
    from vocab.dimse import StoreStatus

    spool = Spool(tmp_path / "spool")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    intake = Intake(spool, ledger, overwrite_instances=overwrite)
    series = make_series(SeriesSpec(slices=12))
    try:
        for ds in series:  # one race per instance: two senders, same UID, other pixels
            other = copy.deepcopy(ds)
            arr = other.pixel_array.copy()
            arr[:8, :8] = 4000
            other.PixelData = arr.tobytes()
            files = [_arrived(spool, x, f"{ds.SOPInstanceUID}-{i}.dcm") for i, x in enumerate((ds, other))]
            gate = threading.Barrier(2)
            results: dict[int, StoreStatus] = {}

            def send(i: int) -> None:
                gate.wait()
                results[i] = intake.store(files[i], calling_aet="A", sop_class_uid=str(ds.SOPClassUID),
                                          sop_instance_uid=str(ds.SOPInstanceUID),
                                          transfer_syntax=str(ds.file_meta.TransferSyntaxUID)).status

            threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            kept = dcmread(spool.path(ledger.stored_instance(str(ds.SOPInstanceUID)).path)).pixel_array
            if overwrite:  # both accepted, one after the other: what is kept is one of the two, whole
                assert list(results.values()) == [StoreStatus.SUCCESS] * 2
            else:  # the first is kept; the second is refused, not silently put in its place
                assert sorted(results.values()) == [StoreStatus.SUCCESS, StoreStatus.UID_WITH_OTHER_CONTENT]
                winner = next(i for i, s in results.items() if s is StoreStatus.SUCCESS)
                assert np.array_equal(kept, (ds, other)[winner].pixel_array)
            assert any(np.array_equal(kept, x.pixel_array) for x in (ds, other))
    finally:
        ledger.close()
