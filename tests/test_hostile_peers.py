"""Unauthenticated peers cannot stall, starve or bloat the node (real ``serve``, raw sockets, real SCUs)."""

from __future__ import annotations

import signal
import ssl
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from dicomgen import SeriesSpec, make_series
from netutil import self_signed_cert
from nodeproc import NodeProcess, pynetdicom_send
from rawpeer import (A_ABORT, A_ASSOCIATE_RQ, connect, deflate_bomb, pdu_header, rss_kb, stalled_header,
                     stream_oversized_pdu, wait_closed)

SUCCESS = 0x0000
#: short timeouts keep every test to seconds; the assertions allow generous slack on a busy 2-core machine
FAST = {"acse_timeout": 2.0, "network_timeout": 3.0, "dimse_timeout": 3.0}


def echo_ae(**timeouts: float) -> AE:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 10
    for k, v in timeouts.items():
        setattr(ae, k, v)
    return ae


def echo(port: int, **kw: object) -> bool:
    assoc = echo_ae().associate("127.0.0.1", port, ae_title="DICOMNODE", **kw)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def test_a_silent_connection_does_not_block_tls_associations(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path / "certs", "node")
    node = NodeProcess(tmp_path / "n", node=FAST, security={"tls": {"cert": str(cert), "key": str(key)}})
    node.start(ready="port")
    try:
        silent = connect(node.port)  # never starts its TLS handshake
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        started = time.monotonic()
        assert echo(node.port, tls_args=(client, "127.0.0.1"))
        assert time.monotonic() - started < 5  # not held up by the silent peer
        closed_after, _ = wait_closed(silent, timeout=15)
        assert closed_after is not None, "the silent connection was never closed"
    finally:
        node.stop()


def test_ten_stalled_pdu_headers_do_not_lock_senders_out(tmp_path: Path) -> None:
    acse = 10.0
    with NodeProcess(tmp_path / "n", node={**FAST, "acse_timeout": acse, "max_associations": 10}) as node:
        stalled = [stalled_header(node.port) for _ in range(10)]
        started = time.monotonic()
        assert echo(node.port), "ten stalled connections locked a sender out"
        assert time.monotonic() - started < acse / 2  # they hold no association slot
        for s in stalled:  # and their sockets are closed at the ACSE deadline, not left open
            assert wait_closed(s, timeout=acse + 8)[0] is not None


def test_connections_waiting_for_their_association_request_are_bounded(tmp_path: Path) -> None:
    # max(16, 4 x max_associations) = 16 may wait; the 17th is closed at once
    with NodeProcess(tmp_path / "n", node={**FAST, "acse_timeout": 10.0, "max_associations": 2}) as node:
        waiting = [stalled_header(node.port) for _ in range(16)]
        time.sleep(0.5)
        extra = connect(node.port)
        closed_after, _ = wait_closed(extra, timeout=5)
        assert closed_after is not None
        assert "connections already wait for their association request" in node.log()
        for s in waiting:
            s.close()


def test_a_stalled_pdu_after_association_is_cut_at_the_network_timeout(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node=FAST) as node:
        ae = echo_ae(network_timeout=60)  # the SCU itself waits longer: the node must cut
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        sock = assoc.dul.socket.socket  # the SCU's own connection: send half a P-DATA-TF by hand
        sock.sendall(pdu_header(0x04, 100) + b"\0" * 10)
        deadline = time.monotonic() + FAST["network_timeout"] + 8
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
        assert echo(node.port)


def test_a_pdu_declared_larger_than_allowed_is_aborted_unread(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node=FAST) as node:
        s = connect(node.port)
        s.sendall(pdu_header(A_ASSOCIATE_RQ, 1 << 20))  # 1 MiB association request: above the cap
        closed_after, got = wait_closed(s, timeout=5)
        assert closed_after is not None
        assert got[:1] == bytes([A_ABORT]) and len(got) == 10  # one A-ABORT PDU, then the connection closes
        assert echo(node.port)


def test_a_4_gb_pdu_does_not_grow_the_nodes_memory(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node=FAST) as node:
        before = rss_kb(node.proc.pid)
        taken = stream_oversized_pdu(node.port, declared=0xFFFFFFFF, send_mb=256)
        assert taken < 64 << 20  # the node stopped reading long before 256 MB
        assert rss_kb(node.proc.pid) - before < 50_000
        assert rss_kb(node.proc.pid, "VmHWM") - before < 100_000
        assert echo(node.port)


def test_p_data_above_max_pdu_aborts_the_association(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node={**FAST, "max_pdu": 16384}) as node:
        ae = echo_ae()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(pdu_header(0x04, 1 << 24) + b"\0" * 65536)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted and not assoc.is_established
        # a sender that respects max_pdu still stores large images (many full-size PDUs each)
        series = make_series(SeriesSpec(slices=2, rows=256, cols=256))
        assert pynetdicom_send(node.port, series) == [SUCCESS] * 2


@pytest.mark.parametrize("junk, why", [
    (b"GET / HTTP/1.1\r\n", "not a DICOM PDU"),
    (pdu_header(A_ASSOCIATE_RQ, 12) + b"\x00\x01hello world", "malformed A_ASSOCIATE_RQ"),
], ids=["http-request", "garbled-association-request"])
def test_junk_on_the_port_gets_one_log_line_and_is_closed_at_once(tmp_path: Path, junk: bytes, why: str) -> None:
    with NodeProcess(tmp_path / "n", node={"acse_timeout": 30.0}) as node:
        s = connect(node.port)
        port = s.getsockname()[1]
        s.sendall(junk)
        closed_after, _ = wait_closed(s, timeout=10)
        assert closed_after is not None and closed_after < 5  # not after the 30 s ACSE timeout
        time.sleep(0.3)
        lines = [ln for ln in node.log().splitlines() if f"127.0.0.1:{port}" in ln]
        assert len(lines) == 1, lines
        assert why in lines[0]
        for noise in ("Unknown PDU type", "Unable to decode", "Traceback", "ERROR"):
            assert noise not in node.log()
        assert echo(node.port)


def test_sigterm_stops_serve_within_its_bound_despite_stalled_peers(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n", node={"acse_timeout": 60.0, "network_timeout": 60.0, "dimse_timeout": 2.0})
    node.start()
    try:
        ae = echo_ae()
        idle = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")  # established, then half a PDU
        assert idle.is_established
        idle.dul.socket.socket.sendall(pdu_header(0x04, 100))
        stalled = [stalled_header(node.port) for _ in range(10)]
        silent = connect(node.port)
        time.sleep(0.5)
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(2.0 + 15) == 0  # README: min(dimse_timeout, 30) s + 5 s
        assert time.monotonic() - started < 2.0 + 5 + 3
        for s in [*stalled, silent]:
            s.close()
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def _template(tmp_path: Path) -> Path:
    ds = make_series(SeriesSpec(slices=1, rows=64, cols=64))[0]
    p = tmp_path / "template.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def _send_file(port: int, path: Path) -> int | None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MRImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()


class PeakRss:
    """Samples the resident memory of a process in the background; ``peak`` minus ``idle`` is the growth."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = rss_kb(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, KeyError):
                return

    def __enter__(self) -> "PeakRss":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.mark.parametrize("rows, cols, pixel_bytes, padding_bytes", [
    (64, 64, 400 << 20, 0), (64, 64, 64 * 64 * 2, 400 << 20), (8192, 8192, 8192 * 8192 * 2, 0),
], ids=["pixel-data-larger-than-declared", "padding-after-the-pixel-data", "image-larger-than-max_inflated_mb"])
def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path, rows: int, cols: int,
                                                                   pixel_bytes: int, padding_bytes: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the SCU sends the file as it is
    bomb = deflate_bomb(tmp_path / "bomb.dcm", _template(tmp_path), pixel_bytes, rows, cols, padding_bytes)
    assert bomb.stat().st_size < 2 << 20
    with NodeProcess(tmp_path / "n", node={"max_inflated_mb": 64}) as node:
        with PeakRss(node.proc.pid) as mem:
            status = _send_file(node.port, bomb)
        assert status is not None and 0xC000 <= status <= 0xCFFF
        assert (mem.peak - mem.idle) < 100_000, f"serve grew by {(mem.peak - mem.idle) // 1024} MB"
        reasons = node.status()["rejections"]
        assert reasons and "inflat" in reasons[0]["reason"], reasons
        assert not list((node.storage / "spool" / ".incoming").iterdir())
        # an honest deflated instance still goes in
        honest = make_series(SeriesSpec(slices=1, rows=64, cols=64))[0]
        from pydicom.uid import DeflatedExplicitVRLittleEndian

        honest.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        p = tmp_path / "honest.dcm"
        honest.save_as(p, enforce_file_format=True)
        assert _send_file(node.port, p) == SUCCESS
