"""deliver(): C-STORE of a built synthetic series to real peers on loopback.

Peers: dcmtk storescp, Orthanc (the PACS), and pynetdicom SCPs answering chosen statuses.
"""

from __future__ import annotations

import io
import logging
import shutil
import ssl
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, MRImageStorage

from dicomgen import SeriesSpec, make_secondary_capture, make_series, phantom
from dicomgen import write_series as write_source
from dicom_node.build import ModelIdentity, build_synthetic_series, write_series
from dicom_node.config import Destination, Direction, OutputConfig, TLSConfig
from dicom_node.net.scu import DeliveryResult, classify_status, deliver
from dicom_node.volume import load_series
from netutil import DcmtkStoreSCP, PynetdicomStoreSCP, free_port, needs_dcmtk, self_signed_cert
from orthanc import OrthancError, OrthancServer, needs_orthanc, orthanc  # noqa: F401 - fixture

CALLING = "DICOMNODE"
MODEL = ModelIdentity(name="t1t2-unet", version="2.1.0", identity="sha256:0f3a9c")


def _synthetic(tmp_path: Path, slices: int = 8) -> tuple[list[Path], pydicom.Dataset]:
    """A real synthetic series on disk (what the worker hands to deliver)."""
    src = make_series(SeriesSpec(slices=slices, rows=48, cols=48))
    vol = load_series(write_source(src, tmp_path / "source"))
    dss = build_synthetic_series(vol, phantom(vol.pixels.shape, "T2"), direction=Direction.T1_TO_T2,
                                 model=MODEL, output=OutputConfig(), node_ae_title=CALLING)
    return write_series(dss, tmp_path / "out"), src[0]


def _uids(paths: list[Path]) -> list[str]:
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]


def _dest(port: int, ae: str = "STORESCP") -> Destination:
    return Destination(ae_title=ae, host="127.0.0.1", port=port, name="peer")


def test_status_classification() -> None:
    assert classify_status(0x0000)[:2] == (True, False)
    for warning in (0xB000, 0xB006, 0xB007):
        assert classify_status(warning)[:2] == (True, False)
    for retry in (0xA700, 0xA701, 0xA7FF):
        assert classify_status(retry)[:2] == (False, True)
    for permanent in (0xA900, 0xC000, 0xC123, 0x0122, 0x0110, 0x0211):
        assert classify_status(permanent)[:2] == (False, False)


@needs_dcmtk
def test_dcmtk_storescp_receives_every_instance(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files, src = _synthetic(tmp_path, slices=12)
    caplog.set_level(logging.INFO, logger="dicom_node.net.scu")
    with DcmtkStoreSCP(tmp_path / "received") as scp:
        result = deliver(files, _dest(scp.port, scp.ae_title), calling_ae_title=CALLING, timeout=10)
    assert result.ok and not result.retryable and result.error is None
    assert [o.status for o in result.outcomes] == [0x0000] * 12
    assert [o.sop_instance_uid for o in result.outcomes] == _uids(files)
    received = sorted((tmp_path / "received").iterdir())
    assert len(received) == 12
    sent = {p.name.removesuffix(".dcm"): p for p in files}
    for p in received:  # round trip: what arrived is what was built
        got = pydicom.dcmread(p)
        orig = pydicom.dcmread(sent[got.SOPInstanceUID])
        assert got.PixelData == orig.PixelData
        assert got.SeriesInstanceUID == orig.SeriesInstanceUID
    # one log line for the association, with Nagle off on the real socket and no patient data
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.net.scu"]
    assert len(lines) == 1
    line = lines[0]
    assert "tcp_nodelay=1" in line and "stored=12" in line and f"calling={CALLING}" in line and "called=STORESCP" in line
    for private in (str(src.PatientName), "Phantom", src.PatientID, src.PatientBirthDate):
        assert private not in line


@needs_orthanc
def test_delivery_into_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:  # noqa: F811
    files, src = _synthetic(tmp_path, slices=10)
    result = deliver(files, orthanc.destination(), calling_ae_title=CALLING, timeout=10)
    assert result.ok, result
    built = {p.name.removesuffix(".dcm"): p for p in files}
    first = pydicom.dcmread(files[0], stop_before_pixels=True)

    series = orthanc.series_of_study(src.StudyInstanceUID)
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in series] == [first.SeriesInstanceUID]
    assert len(series[0]["Instances"]) == 10
    assert series[0]["MainDicomTags"]["SeriesDescription"] == first.SeriesDescription
    instances = orthanc.instances_of_series(first.SeriesInstanceUID)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == set(built)
    for inst in instances[:3]:
        tags = orthanc.instance_tags(inst["ID"])
        orig = pydicom.dcmread(built[tags["SOPInstanceUID"]])
        assert tags["StudyInstanceUID"] == src.StudyInstanceUID
        assert tags["FrameOfReferenceUID"] == src.FrameOfReferenceUID
        assert tags["ImagePositionPatient"] == "\\".join(str(v) for v in orig.ImagePositionPatient)
        assert tags["ImageType"] == "DERIVED\\SECONDARY\\OTHER"
        assert orthanc.instance_tags_by_number(inst["ID"])["0008,001c"] == "YES"  # Synthetic Data
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(inst["ID"])))
        assert stored.PixelData == orig.PixelData
        np.testing.assert_array_equal(stored.pixel_array, orig.pixel_array)

    # sending again (a re-run) keeps one series with the same instances
    again = deliver(files, orthanc.destination(), calling_ae_title=CALLING, timeout=10)
    assert again.ok
    series = orthanc.series_of_study(src.StudyInstanceUID)
    assert len(series) == 1 and len(series[0]["Instances"]) == 10


@needs_orthanc
def test_wrong_called_aet_is_a_retryable_rejection(tmp_path: Path, orthanc: OrthancServer) -> None:  # noqa: F811
    files, _ = _synthetic(tmp_path, slices=3)
    dest = Destination(ae_title="NOT_ORTHANC", host=orthanc.host, port=orthanc.dicom_port)
    result = deliver(files, dest, calling_ae_title=CALLING, timeout=10)
    assert not result.ok and result.retryable
    assert result.error is not None and "rejected" in result.error
    assert all(not o.stored and o.retryable and o.status is None for o in result.outcomes)
    assert len(result.outcomes) == 3


def test_destination_down_is_retryable(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=3)
    started = time.monotonic()
    result = deliver(files, _dest(free_port()), calling_ae_title=CALLING, timeout=5)
    assert time.monotonic() - started < 5
    assert isinstance(result, DeliveryResult) and not result.ok and result.retryable
    assert result.error and "cannot connect" in result.error
    assert [o.sop_instance_uid for o in result.outcomes] == _uids(files)
    assert all(o.retryable and not o.stored for o in result.outcomes)


@pytest.mark.parametrize(
    ("status", "ok", "retryable"),
    [(0xC000, False, False), (0xA900, False, False), (0xA700, False, True), (0xB000, True, False),
     (0xB007, True, False)],
    ids=["C000-permanent", "A900-permanent", "A700-retryable", "B000-warning-stored", "B007-warning-stored"],
)
def test_peer_status_is_recorded_and_classified(tmp_path: Path, status: int, ok: bool, retryable: bool) -> None:
    files, _ = _synthetic(tmp_path, slices=3)
    with PynetdicomStoreSCP(status) as scp:
        result = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=10)
        assert len(scp.received) == 3  # the association went on after each answer
    assert result.error is None
    assert [o.status for o in result.outcomes] == [status] * 3
    assert all(o.stored is ok for o in result.outcomes)
    assert result.ok is ok and result.retryable is retryable
    assert f"0x{status:04X}" in result.outcomes[0].detail


def test_one_permanent_failure_among_successes(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=4)
    with PynetdicomStoreSCP(lambda i, ds: 0xC000 if i == 2 else 0x0000) as scp:
        result = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=10)
    assert [o.stored for o in result.outcomes] == [True, True, False, True]
    assert not result.ok and not result.retryable
    retry = None
    with PynetdicomStoreSCP(lambda i, ds: 0xA702 if i == 1 else 0x0000) as scp:
        retry = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=10)
    assert not retry.ok and retry.retryable and retry.stored_count == 3


def test_abort_midway_leaves_the_rest_retryable(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=5)
    with PynetdicomStoreSCP(0x0000, delay=2.0, delay_at=2) as scp:
        result = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=0.5)
    assert [o.stored for o in result.outcomes] == [True, True, False, False, False]
    third = result.outcomes[2]
    assert third.status is None and third.retryable and "no response" in third.detail
    assert all(o.retryable and "not sent" in o.detail for o in result.outcomes[3:])
    assert not result.ok and result.retryable and result.error


def test_sop_class_not_supported_is_permanent(tmp_path: Path) -> None:
    files, src = _synthetic(tmp_path, slices=2)
    with PynetdicomStoreSCP(0x0000, sop_classes=[CTImageStorage]) as scp:
        result = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=10)
    assert not result.ok and not result.retryable
    assert all(not o.stored and not o.retryable for o in result.outcomes)
    # mixed: the accepted class is stored, the other one fails permanently
    sc = make_secondary_capture(src.StudyInstanceUID)
    sc_path = write_source([sc], tmp_path / "sc")[0]
    with PynetdicomStoreSCP(0x0000, sop_classes=[MRImageStorage]) as scp:
        mixed = deliver([*files, sc_path], _dest(scp.port), calling_ae_title=CALLING, timeout=10)
    assert [o.stored for o in mixed.outcomes] == [True, True, False]
    assert mixed.outcomes[2].sop_instance_uid == sc.SOPInstanceUID
    assert not mixed.outcomes[2].retryable and "presentation context" in mixed.outcomes[2].detail
    assert not mixed.retryable


def test_unreadable_file_is_a_permanent_failure_of_that_file(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with PynetdicomStoreSCP(0x0000) as scp:
        result = deliver([junk, *files], _dest(scp.port), calling_ae_title=CALLING, timeout=10)
    bad = result.outcomes[0]  # outcomes follow the order of the files given
    assert not bad.stored and not bad.retryable and "cannot read" in bad.detail
    assert [o.sop_instance_uid for o in result.outcomes[1:]] == _uids(files)
    assert result.stored_count == 2


def test_nothing_to_send_is_ok() -> None:
    result = deliver([], _dest(free_port()), calling_ae_title=CALLING)
    assert result.ok and result.outcomes == [] and result.error is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_tls_destination(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=3)
    server_cert, server_key = self_signed_cert(tmp_path / "pki", "server")
    client_cert, client_key = self_signed_cert(tmp_path / "pki", "client")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_cert))
    server_ctx.load_cert_chain(str(server_cert), str(server_key))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    tls = TLSConfig(cert=client_cert, key=client_key, ca=server_cert)
    with PynetdicomStoreSCP(0x0000, ssl_context=server_ctx) as scp:
        result = deliver(files, Destination("STORESCP", "127.0.0.1", scp.port, tls=tls), calling_ae_title=CALLING, timeout=10)
        assert result.ok, result
        assert len(scp.received) == 3
        # a peer we do not trust (CA is the client cert): no association, retryable
        untrusted = TLSConfig(cert=client_cert, key=client_key, ca=client_cert)
        bad = deliver(files, Destination("STORESCP", "127.0.0.1", scp.port, tls=untrusted), calling_ae_title=CALLING, timeout=5)
    assert not bad.ok and bad.retryable and bad.error


def test_peer_accepting_only_implicit_vr_gets_converted_datasets(tmp_path: Path) -> None:
    files, _ = _synthetic(tmp_path, slices=2)
    with PynetdicomStoreSCP(0x0000, transfer_syntaxes=[ImplicitVRLittleEndian]) as scp:
        result = deliver(files, _dest(scp.port), calling_ae_title=CALLING, timeout=10)
        assert len(scp.received) == 2
    assert result.ok, result


@needs_orthanc
def test_orthanc_down_then_up_again(tmp_path: Path) -> None:
    files, src = _synthetic(tmp_path, slices=4)
    with OrthancServer(tmp_path / "pacs") as pacs:
        pacs.stop()
        down = deliver(files, pacs.destination(), calling_ae_title=CALLING, timeout=5)
        assert down.retryable and down.error
        pacs.start()  # same storage, same ports
        up = deliver(files, pacs.destination(), calling_ae_title=CALLING, timeout=10)
        assert up.ok
        (series,) = pacs.series_of_study(src.StudyInstanceUID)
        assert len(series["Instances"]) == 4


@needs_orthanc
def test_orthanc_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path / "broken", extra_config={"HttpPort": "not a port"}, start_timeout=20)
    with pytest.raises(OrthancError, match="did not start") as info:
        server.start()
    assert "orthanc.log" in str(info.value)
    assert server.proc is None


@needs_dcmtk
def test_no_response_is_lost_when_the_process_is_busy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom's reactor could take a C-STORE-RSP meant for send_c_store ("Received unexpected C-STORE
    service message"): the sender then stalled for the DIMSE timeout and aborted.  Threads competing for the
    GIL (a busy worker) made it happen in most deliveries of 50 instances."""
    import threading

    src = make_series(SeriesSpec(slices=30, rows=16, cols=16))
    files = write_source(src, tmp_path / "src")
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass

    hogs = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    results = []
    try:
        for h in hogs:
            h.start()
        with DcmtkStoreSCP(tmp_path / "received", extra=["--ignore"]) as scp:
            for _ in range(3):
                results.append(deliver(files, _dest(scp.port, scp.ae_title), calling_ae_title=CALLING, timeout=3))
    finally:
        stop.set()
        for h in hogs:
            h.join()
    assert [r.stored_count for r in results] == [30, 30, 30], [r.error for r in results]
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]
