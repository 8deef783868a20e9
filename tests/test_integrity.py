"""A SOP Instance UID means one instance: reuse in another series and resends with new content, over real associations."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicomgen import SeriesSpec, make_series
from nodeproc import NodeProcess, ledger_rows, pynetdicom_send, spooled

SUCCESS, UID_IN_ANOTHER_SERIES, UID_WITH_OTHER_CONTENT = 0x0000, 0xC230, 0xC231


def changed_pixels(ds):
    other = copy.deepcopy(ds)
    arr = other.pixel_array.copy()
    arr[:8, :8] = 4000
    other.PixelData = arr.tobytes()
    return other


@pytest.fixture
def node(tmp_path: Path):
    with NodeProcess(tmp_path / "node") as n:
        yield n


def test_a_sop_instance_uid_reused_in_another_series_is_refused_and_recorded(node: NodeProcess) -> None:
    a = make_series(SeriesSpec(slices=4))
    assert pynetdicom_send(node.port, a) == [SUCCESS] * 4
    intruder = copy.deepcopy(a[1])
    intruder.SeriesInstanceUID = generate_uid()  # another series claims an instance of the first
    assert pynetdicom_send(node.port, [intruder]) == [UID_IN_ANOTHER_SERIES]
    # nothing of it was kept: no file in the new series' folder, no series row, the first series intact
    assert not spooled(node, intruder).exists()
    assert not spooled(node, intruder).parent.exists() or not list(spooled(node, intruder).parent.iterdir())
    assert ledger_rows(node, "select series_uid, instances from series") == [(a[0].SeriesInstanceUID, 4)]
    assert dcmread(spooled(node, a[1])).SeriesInstanceUID == a[0].SeriesInstanceUID
    (rej,) = node.status()["rejections"]
    assert rej["status"] == "0xC230" and rej["sop_instance_uid"] == a[1].SOPInstanceUID
    assert a[0].SeriesInstanceUID in rej["reason"]
    assert not list((node.storage / "spool" / ".incoming").iterdir())


def test_new_content_under_a_stored_uid_is_refused_by_default_and_an_identical_resend_is_a_no_op(
        node: NodeProcess) -> None:
    a = make_series(SeriesSpec(slices=4))
    assert pynetdicom_send(node.port, a) == [SUCCESS] * 4
    before = spooled(node, a[0]).read_bytes()
    assert pynetdicom_send(node.port, [a[0]]) == [SUCCESS]  # identical
    implicit = copy.deepcopy(a[2])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # the same instance in another transfer syntax
    assert pynetdicom_send(node.port, [implicit]) == [SUCCESS]
    assert pynetdicom_send(node.port, [changed_pixels(a[0])]) == [UID_WITH_OTHER_CONTENT]
    assert spooled(node, a[0]).read_bytes() == before  # the stored instance stays
    (rej,) = node.status()["rejections"]
    assert rej["status"] == "0xC231" and "overwrite_instances = false" in rej["reason"]
    assert ledger_rows(node, "select instances, generation from series") == [(4, 1)]
    assert node.status()["notes"] == []


def test_with_overwrite_instances_new_content_replaces_the_instance_and_the_series_is_processed_again(
        tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", storage={"overwrite_instances": True}) as node:
        a = make_series(SeriesSpec(slices=4))
        assert pynetdicom_send(node.port, a) == [SUCCESS] * 4
        node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "queued", what="first job")
        assert pynetdicom_send(node.port, [a[0]]) == [SUCCESS]  # identical: nothing happens
        assert len(node.status()["jobs"]) == 1 and node.status()["notes"] == []
        new = changed_pixels(a[0])
        assert pynetdicom_send(node.port, [new]) == [SUCCESS]
        assert np.array_equal(dcmread(spooled(node, a[0])).pixel_array, new.pixel_array)
        st = node.wait_for(lambda s: len(s["jobs"]) == 2 and s["series"][0]["state"] == "selected",
                           what="the series processed again")
        assert st["series"][0]["generation"] == 2 and st["series"][0]["instances"] == 4
        newest, oldest = st["jobs"]
        assert newest["state"] == "queued" and oldest["state"] == "superseded"
        (note,) = st["notes"]
        assert note["sop_instance_uid"] == a[0].SOPInstanceUID and "replaced with new content" in note["text"]
        assert st["rejections"] == []
