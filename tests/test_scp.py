"""The Storage SCP over real loopback associations (dcmtk and pynetdicom senders)."""

from __future__ import annotations

import os
import sys
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomgen import SeriesSpec, make_secondary_capture, make_series, write_series
from netutil import SHARED_DATA, dcmtk, dcmtk_env, needs_dcmtk, needs_shared, storescu
from nodeproc import NodeProcess, ledger_rows, pynetdicom_send, spooled

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@pytest.fixture
def node(tmp_path: Path):
    with NodeProcess(tmp_path / "node") as n:
        yield n


@needs_dcmtk
def test_echo_and_store_with_dcmtk(node: NodeProcess, tmp_path: Path) -> None:
    echo = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                          env=dcmtk_env(), capture_output=True, text=True)
    assert echo.returncode == 0, echo.stderr
    series = make_series(SeriesSpec(weighting="T1", slices=10))
    files = write_series(series, tmp_path / "t1")
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stderr
    for ds in series:
        back = dcmread(spooled(node, ds))
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert (back.pixel_array == ds.pixel_array).all()
    st = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] != "receiving", what="series completion")
    s = st["series"][0]
    assert (s["series_uid"], s["instances"], s["calling_aet"]) == (series[0].SeriesInstanceUID, 10, "STORESCU")
    assert s["state"] == "selected" and s["classification"] == "T1"
    job = st["jobs"][0]
    assert job["state"] == "queued" and job["source_series_uid"] == series[0].SeriesInstanceUID
    assert job["direction"] == "t1-to-t2"
    assert ledger_rows(node, "select count(*) from instances") == [(10,)]


def test_store_with_pynetdicom_and_resend_is_idempotent(node: NodeProcess) -> None:
    series = make_series(SeriesSpec(weighting="T2", slices=6))
    assert pynetdicom_send(node.port, series) == [SUCCESS] * 6
    assert pynetdicom_send(node.port, series[:3]) == [SUCCESS] * 3  # resend
    assert ledger_rows(node, "select count(*) from instances") == [(6,)]
    folder = spooled(node, series[0]).parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{d.SOPInstanceUID}.dcm" for d in series)
    assert not list((node.storage / "spool" / ".incoming").iterdir())
    st = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "selected", what="completion")
    assert st["series"][0]["instances"] == 6 and st["series"][0]["classification"] == "T2"


@needs_dcmtk
def test_unknown_calling_and_wrong_called_ae_are_rejected(node: NodeProcess, tmp_path: Path) -> None:
    files = write_series(make_series(SeriesSpec(slices=2)), tmp_path / "s")
    bad_calling = storescu(node.port, files, calling="INTRUDER")
    assert bad_calling.returncode != 0 and "Calling AE Title Not Recognized" in bad_calling.stderr
    bad_called = storescu(node.port, files, called="SOMEONEELSE")
    assert bad_called.returncode != 0 and "Called AE Title Not Recognized" in bad_called.stderr
    assert ledger_rows(node, "select count(*) from instances") == [(0,)]


def test_max_associations_rejects_extra_ones(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with NodeProcess(tmp_path / "n", node={"max_associations": 2}) as node:
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            extra = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            assert extra.is_rejected
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        time.sleep(0.5)
        again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert again.is_established
        again.release()


def test_spool_below_free_space_floor_answers_out_of_resources(tmp_path: Path) -> None:
    # a floor above the disk's free space: the spool is "full" for the node
    with NodeProcess(tmp_path / "n", storage={"min_free_mb": 1 << 40}) as node:
        series = make_series(SeriesSpec(slices=3))
        assert pynetdicom_send(node.port, series) == [OUT_OF_RESOURCES] * 3
        assert ledger_rows(node, "select count(*) from instances") == [(0,)]
        reasons = ledger_rows(node, "select status, reason from rejections")
        assert len(reasons) == 3 and all(s == OUT_OF_RESOURCES and "min_free_mb" in r for s, r in reasons)
        assert not spooled(node, series[0]).exists()


def test_unwritable_spool_folder_answers_out_of_resources(node: NodeProcess) -> None:
    series = make_series(SeriesSpec(slices=2))
    study_dir = node.storage / "spool" / series[0].StudyInstanceUID
    study_dir.mkdir(parents=True)
    immutable = subprocess.run(["chattr", "+i", str(study_dir)], capture_output=True)
    if immutable.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("chattr +i not supported on this file system")
        study_dir.chmod(0o500)
    try:
        assert pynetdicom_send(node.port, series) == [OUT_OF_RESOURCES] * 2
        assert ledger_rows(node, "select count(*) from instances") == [(0,)]
        # the node keeps serving: another study still goes in
        other = make_series(SeriesSpec(slices=2))
        assert pynetdicom_send(node.port, other) == [SUCCESS] * 2
    finally:
        subprocess.run(["chattr", "-i", str(study_dir)], capture_output=True)
        study_dir.chmod(0o755)


def _truncated_file(tmp_path: Path) -> Path:
    ds = make_series(SeriesSpec(slices=1))[0]
    p = tmp_path / "truncated.dcm"
    ds.save_as(p, enforce_file_format=True)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 3000])
    return p


def test_malformed_instances_fail_while_a_parallel_association_succeeds(node: NodeProcess, tmp_path: Path) -> None:
    no_pixels = make_series(SeriesSpec(slices=1))[0]
    del no_pixels.PixelData
    bad_uid = make_series(SeriesSpec(slices=1))[0]
    bad_uid.SeriesInstanceUID = "1.2.3.abc/../../etc"
    truncated = _truncated_file(tmp_path)
    good = make_series(SeriesSpec(slices=20))

    results: dict[str, list] = {}

    def send_good() -> None:
        results["good"] = pynetdicom_send(node.port, good, calling="SENDER1")

    t = threading.Thread(target=send_good)
    t.start()
    results["bad"] = pynetdicom_send(node.port, [no_pixels, bad_uid, truncated], calling="SENDER2")
    t.join(60)
    assert results["good"] == [SUCCESS] * 20
    assert all(s is not None and s >= CANNOT_UNDERSTAND for s in results["bad"]), results["bad"]
    reasons = [r for (r,) in ledger_rows(node, "select reason from rejections order by id")]
    assert any("without pixel data" in r for r in reasons)
    assert any("invalid SeriesInstanceUID" in r for r in reasons)
    assert any("truncated" in r for r in reasons)
    assert ledger_rows(node, "select count(*) from instances") == [(20,)]
    assert not list(node.storage.rglob("etc"))
    # and the server is still up for more
    assert pynetdicom_send(node.port, make_series(SeriesSpec(slices=1))) == [SUCCESS]


def test_localizer_non_mr_and_derived_are_stored_but_not_selected(node: NodeProcess) -> None:
    study = generate_uid()
    localizer = make_series(SeriesSpec(slices=3, study_uid=study, description="localizer",
                                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    derived = make_series(SeriesSpec(slices=10, study_uid=study, image_type=("DERIVED", "SECONDARY", "MPR")))
    synthetic = make_series(SeriesSpec(slices=10, study_uid=study))
    for ds in synthetic:
        ds.SyntheticData = "YES"
    sc = make_secondary_capture(study)
    t1 = make_series(SeriesSpec(slices=10, study_uid=study))
    everything = localizer + derived + synthetic + [sc] + t1
    assert pynetdicom_send(node.port, everything) == [SUCCESS] * len(everything)
    st = node.wait_for(lambda s: len(s["series"]) == 5 and all(x["state"] != "receiving" for x in s["series"]),
                       what="all five series complete")
    by_uid = {s["series_uid"]: s for s in st["series"]}
    reason = lambda ds: by_uid[ds.SeriesInstanceUID]["reason"]  # noqa: E731
    assert by_uid[localizer[0].SeriesInstanceUID]["state"] == "not_selected"
    assert "localizer" in reason(localizer[0]) or "slices" in reason(localizer[0])
    assert by_uid[derived[0].SeriesInstanceUID]["state"] == "not_selected" and "DERIVED" in reason(derived[0])
    assert by_uid[synthetic[0].SeriesInstanceUID]["state"] == "not_selected" and "Synthetic" in reason(synthetic[0])
    assert by_uid[sc.SeriesInstanceUID]["state"] == "not_selected" and "not an MR" in reason(sc)
    assert by_uid[t1[0].SeriesInstanceUID]["state"] == "selected"
    assert [j["source_series_uid"] for j in st["jobs"]] == [t1[0].SeriesInstanceUID]
    for ds in everything:
        assert spooled(node, ds).is_file()


def test_four_parallel_senders_lose_nothing(node: NodeProcess) -> None:
    study = generate_uid()
    per_sender = [make_series(SeriesSpec(slices=25, study_uid=study, seed=i)) for i in range(4)]
    results: dict[int, list] = {}

    def send(i: int) -> None:
        results[i] = pynetdicom_send(node.port, per_sender[i], calling=f"SENDER{i + 1}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i] == [SUCCESS] * 25 for i in range(4)), results
    assert ledger_rows(node, "select count(*) from instances") == [(100,)]
    st = node.wait_for(lambda s: len(s["series"]) == 4 and all(x["state"] == "selected" for x in s["series"]),
                       what="four series selected")
    assert sorted(x["instances"] for x in st["series"]) == [25] * 4
    assert len(st["jobs"]) == 4


def test_late_instances_reopen_the_series_as_a_new_job(node: NodeProcess) -> None:
    series = make_series(SeriesSpec(slices=12))
    assert pynetdicom_send(node.port, series[:8]) == [SUCCESS] * 8
    node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "queued", what="first job")
    assert pynetdicom_send(node.port, series[8:]) == [SUCCESS] * 4
    st = node.wait_for(lambda s: len(s["jobs"]) == 2 and s["series"][0]["state"] == "selected", what="second job")
    s = st["series"][0]
    assert s["instances"] == 12 and s["generation"] == 2
    newest, oldest = st["jobs"]
    assert newest["state"] == "queued" and oldest["state"] == "superseded"
    assert newest["source_series_uid"] == oldest["source_series_uid"] == series[0].SeriesInstanceUID


def test_kill_9_mid_send_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n", series={"quiet_seconds": 2.0}).start()
    series = make_series(SeriesSpec(slices=150, rows=128, cols=128))
    acked: list[str] = []
    killed = threading.Event()

    def on_status(ds, code) -> None:
        if code == SUCCESS:
            acked.append(ds.SOPInstanceUID)
        if len(acked) == 40 and not killed.is_set():
            killed.set()
            node.kill9()

    statuses = pynetdicom_send(node.port, series, on_status=on_status)
    assert killed.is_set() and statuses.count(SUCCESS) == len(acked) < 150
    node.start()  # restart on the same storage
    uids = {u for (u,) in ledger_rows(node, "select sop_instance_uid from instances")}
    assert set(acked) <= uids
    for ds in series:
        if ds.SOPInstanceUID in acked:
            assert dcmread(spooled(node, ds)).SOPInstanceUID == ds.SOPInstanceUID
    # the sender retries the rest; the series completes whole
    rest = [ds for ds in series if ds.SOPInstanceUID not in uids]
    assert pynetdicom_send(node.port, rest) == [SUCCESS] * len(rest)
    st = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "selected", what="completion")
    assert st["series"][0]["instances"] == 150
    assert node.stop() == 0


def test_sigterm_finishes_the_transfer_in_flight_and_exits_0(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n").start()
    series = make_series(SeriesSpec(slices=120, rows=128, cols=128))
    sent: list = []

    def on_status(ds, code) -> None:
        sent.append(code)
        if len(sent) == 10:
            node.proc.terminate()

    statuses = pynetdicom_send(node.port, series, on_status=on_status)
    assert node.proc.wait(60) == 0
    assert statuses == [SUCCESS] * 120  # the association in flight was allowed to finish
    con = sqlite3.connect(node.storage / "ledger.db")
    assert con.execute("select count(*) from instances").fetchone() == (120,)


def test_restart_resumes_a_series_left_receiving(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n", series={"quiet_seconds": 3.0, "complete_on_release": False}).start()
    series = make_series(SeriesSpec(slices=6))
    assert pynetdicom_send(node.port, series) == [SUCCESS] * 6
    node.kill9()
    node.start()
    st = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "selected", what="completion after restart")
    assert st["series"][0]["instances"] == 6 and len(st["jobs"]) == 1
    node.stop()


def test_status_table_and_filters(node: NodeProcess) -> None:
    series = make_series(SeriesSpec(slices=5))
    assert pynetdicom_send(node.port, series) == [SUCCESS] * 5
    node.wait_for(lambda s: s["jobs"], what="job")
    table = node.cli("status").stdout
    assert series[0].SeriesInstanceUID[-12:] in table and "queued" in table  # UIDs shortened in the table
    assert node.status("--state", "failed")["jobs"] == []
    st = node.status("--state", "queued")
    assert set(st) >= {"series", "jobs"}
    job = st["jobs"][0]
    assert set(job) >= {"id", "state", "source_series_uid", "output_series_uid", "error", "created_at", "finished_at"}
    assert "Phantom" not in node.log() and "PHANTOM-001" not in node.log() and "19700101" not in node.log()


def _dicom_files(root: Path) -> list[Path]:
    skip = {"README.md", "LICENSE"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)


# storescu proposes uncompressed syntaxes unless told which compressed one to offer
_STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.5": ["-xr"],
}


def _send_in_own_transfer_syntax(node: NodeProcess, files: list[Path]) -> None:
    by_ts: dict[str, list[Path]] = {}
    for f in files:
        by_ts.setdefault(str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID), []).append(f)
    for ts, group in by_ts.items():
        res = storescu(node.port, group, extra=_STORESCU_TS_OPTION[ts])
        assert res.returncode == 0, (ts, res.stderr[-2000:])


@needs_shared
@needs_dcmtk
def test_every_shared_vendor_file_is_received_in_its_own_syntax_and_decodes(node: NodeProcess) -> None:
    """Siemens/Philips files in explicit/implicit/big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000,
    classic and Enhanced MR (neurolabusc dcm_qa repositories, BSD-2)."""
    import numpy as np

    files = _dicom_files(SHARED_DATA / "dicom")
    assert len(files) >= 20
    _send_in_own_transfer_syntax(node, files)
    for f in files:
        src = dcmread(f)
        got = dcmread(spooled(node, src))
        assert got.SOPInstanceUID == src.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID  # stored as sent
        assert np.array_equal(got.pixel_array, src.pixel_array), f.name
    uids = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert ledger_rows(node, "select count(*) from instances") == [(len(uids),)]


@needs_dcmtk
def test_deflated_transfer_syntax_is_received(node: NodeProcess, tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    series = make_series(SeriesSpec(slices=2))
    paths = []
    for ds in series:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    _send_in_own_transfer_syntax(node, paths)
    for ds in series:
        got = dcmread(spooled(node, ds))
        assert got.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert (got.pixel_array == ds.pixel_array).all()


def test_tls_with_required_client_certificate(tmp_path: Path) -> None:
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    from netutil import self_signed_cert

    server_cert, server_key = self_signed_cert(tmp_path / "certs", "node")
    client_cert, client_key = self_signed_cert(tmp_path / "certs", "modality")
    tls = {"cert": str(server_cert), "key": str(server_key), "ca": str(client_cert), "require_client_cert": True}
    node = NodeProcess(tmp_path / "n", security={"tls": tls})
    # the node only speaks TLS, so wait for its port rather than for a plain C-ECHO
    from netutil import wait_for_port

    log = open(node.log_path, "ab")
    node.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(node.config)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=node.folder)
    try:
        wait_for_port(node.port, proc=node.proc)

        def client(with_cert: bool) -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
            if with_cert:
                ctx.load_cert_chain(str(client_cert), str(client_key))
            return ctx

        series = make_series(SeriesSpec(slices=3))
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(client(True), "127.0.0.1"))
        assert assoc.is_established
        assert [int(assoc.send_c_store(ds).Status) for ds in series] == [SUCCESS] * 3
        assoc.release()
        refused = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(client(False), "127.0.0.1"))
        assert not refused.is_established
        assert ledger_rows(node, "select count(*) from instances") == [(3,)]
    finally:
        node.stop()
