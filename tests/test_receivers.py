"""``[node] receivers = N``: several receiving processes on one port, with the node's limits and durability.

Real ``serve`` processes on loopback; which process holds a connection is read from ``/proc`` (the socket's
inode among the process's descriptors), so nothing here relies on how the kernel happens to spread connections.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from dicomgen import SeriesSpec, make_series
from nodeproc import NodeProcess, ledger_rows, pynetdicom_send, spooled, wait_gone

SUCCESS = 0x0000

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def receiver_pids(node: NodeProcess) -> dict[int, int]:
    """{receiver index: pid} of the receivers serve started (from its log), the living ones only."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"receiver (\d+) started \(pid (\d+)\)", node.log()):
        pids[int(m.group(1))] = int(m.group(2))  # a restarted receiver's later line wins
    return {i: p for i, p in pids.items() if Path(f"/proc/{p}").exists()}


def owner_of(assoc: Association, node: NodeProcess, candidates: list[int]) -> int | None:
    """The PID among *candidates* whose process holds the node's end of *assoc*'s TCP connection."""
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    client_port = sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local_port, remote_port = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        if local_port == node.port and remote_port == client_port:
            inode = f[9]
    assert inode is not None, "the node's end of the connection is not in /proc/net/tcp"
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def verification_ae() -> AE:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def test_parallel_associations_are_received_by_every_process_and_nothing_is_lost(tmp_path: Path) -> None:
    study = generate_uid()
    senders = [make_series(SeriesSpec(slices=15, rows=64, cols=64, study_uid=study, seed=i)) for i in range(4)]
    with NodeProcess(tmp_path / "n", node={"receivers": 2}) as node:
        assert list(receiver_pids(node)) == [1]
        results: dict[int, list[int | None]] = {}
        for _ in range(5):  # until both processes have received something (the kernel picks by address hash)
            results.clear()
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                i, pynetdicom_send(node.port, senders[i], calling=f"SENDER{i + 1}"))) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert all(results[i] == [SUCCESS] * 15 for i in range(4)), results
            closed_by = set(re.findall(r"(MainProcess|receiver-1) dicom_node.net.scp: association from", node.log()))
            if closed_by == {"MainProcess", "receiver-1"}:
                break
        assert closed_by == {"MainProcess", "receiver-1"}, node.log()[-3000:]
        # one ledger, one spool: every instance once, whichever process took it
        assert ledger_rows(node, "select count(*) from instances") == [(60,)]
        for ds in senders[3]:
            assert dcmread(spooled(node, ds)).SOPInstanceUID == ds.SOPInstanceUID
        st = node.wait_for(lambda s: len(s["series"]) == 4 and all(x["state"] == "selected" for x in s["series"]),
                           what="four series complete")
        assert sorted(x["instances"] for x in st["series"]) == [15] * 4
        # /metrics counts what every receiver received (the first round's sends and the resends of later ones)
        m = node.metrics()
        assert m['dicomnode_instances_received_total{outcome="stored"}'] == 60
        assert m['dicomnode_instances_received_total{outcome="duplicate"}'] % 60 == 0  # later rounds resend all
        code, body = node.http_get("/healthz")
        assert code == 200 and "2/2 listening" in body
        assert node.stop() == 0


def test_max_associations_is_one_limit_across_all_receivers(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node={"receivers": 2, "max_associations": 2}) as node:
        ae = verification_ae()
        held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            # each new connection may land on either process: none of them may exceed the shared limit
            for _ in range(6):
                extra = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
                assert extra.is_rejected, "an association beyond node.max_associations was accepted"
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        time.sleep(0.5)
        again = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
        assert all(a.is_established for a in again)
        for a in again:
            a.release()
        assert node.metrics()['dicomnode_associations_rejected_total{reason="association_limit"}'] == 6
        assert node.stop() == 0


def test_a_killed_receiver_frees_its_slot_and_is_restarted(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "n", node={"receivers": 2, "max_associations": 2}) as node:
        serve_pid, child = node.proc.pid, receiver_pids(node)[1]  # type: ignore[union-attr]
        ae = verification_ae()
        on_child = on_serve = None
        for _ in range(40):  # one association held by each process
            a = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            assert a.is_established
            owner = owner_of(a, node, [serve_pid, child])
            if owner == child and on_child is None:
                on_child = a
            elif owner == serve_pid and on_serve is None:
                on_serve = a
            else:
                a.release()
            if on_child and on_serve:
                break
        assert on_child is not None and on_serve is not None
        os.kill(child, signal.SIGKILL)  # the receiver dies with an association open
        wait_gone([child])
        deadline = time.monotonic() + 10
        while on_child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not on_child.is_established
        # its slot died with it: a second association fits beside the one serve still holds
        deadline = time.monotonic() + 30
        while receiver_pids(node).get(1, child) == child and time.monotonic() < deadline:
            time.sleep(0.2)
        restarted = receiver_pids(node)[1]
        assert restarted != child and f"receiver 1 (pid {child}) exited with -9" in node.log()
        second = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert second.is_established, "the killed receiver's association slot was not freed"
        assert on_serve.is_established and on_serve.send_c_echo().Status == SUCCESS
        second.release()
        on_serve.release()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, body = node.http_get("/healthz")
            if code == 200:
                break
            time.sleep(0.3)
        assert code == 200 and "2/2 listening" in body, body
        assert node.stop() == 0
        wait_gone([restarted], timeout=5)


def test_serve_stops_every_receiver_and_leaves_nothing_behind(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # serve keeps its association slots in a folder of its own there
    node = NodeProcess(tmp_path / "n", node={"receivers": 3}).start()
    pids = list(receiver_pids(node).values())
    assert len(pids) == 2
    assert [p.name.startswith("dicomnode-associations-") for p in tmp.iterdir()] == [True]
    assert node.stop() == 0
    wait_gone(pids, timeout=5)
    assert list(tmp.iterdir()) == []


def test_a_series_still_arriving_through_another_receiver_is_not_completed_by_one_release(tmp_path: Path) -> None:
    series = make_series(SeriesSpec(slices=12, rows=64, cols=64))
    with NodeProcess(tmp_path / "n", node={"receivers": 2},
                     series={"quiet_seconds": 120.0, "release_grace_seconds": 0.5}) as node:
        serve_pid, child = node.proc.pid, receiver_pids(node)[1]  # type: ignore[union-attr]
        ae = verification_ae()
        by_owner: dict[int, Association] = {}
        for _ in range(40):  # one association on each process
            a = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            owner = owner_of(a, node, [serve_pid, child])
            if owner is not None and owner not in by_owner:
                by_owner[owner] = a
            else:
                a.release()
            if len(by_owner) == 2:
                break
        assert len(by_owner) == 2
        first, second = by_owner[child], by_owner[serve_pid]
        for ds in series[:6]:
            assert first.send_c_store(ds).Status == SUCCESS
        assert second.send_c_store(series[6]).Status == SUCCESS
        first.release()  # the receiver's association ends; serve's still carries the series
        time.sleep(2.0)  # four times the release grace
        assert node.series(series[0].SeriesInstanceUID)["state"] == "receiving"  # type: ignore[index]
        for ds in series[7:]:
            assert second.send_c_store(ds).Status == SUCCESS
        second.release()  # the last carrier released: complete now, not after quiet_seconds
        st = node.wait_for(lambda s: s["series"] and s["series"][0]["state"] == "selected", timeout=20,
                           what="completion on the last release")
        assert st["series"][0]["instances"] == 12
        assert node.stop() == 0


def test_every_receiver_speaks_tls_with_the_nodes_certificate(tmp_path: Path) -> None:
    import ssl

    from netutil import self_signed_cert

    server_cert, server_key = self_signed_cert(tmp_path / "certs", "node")
    client_cert, client_key = self_signed_cert(tmp_path / "certs", "modality")
    tls = {"cert": str(server_cert), "key": str(server_key), "ca": str(client_cert), "require_client_cert": True}
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    ctx.load_cert_chain(str(client_cert), str(client_key))
    series = make_series(SeriesSpec(slices=12, rows=32, cols=32))
    node = NodeProcess(tmp_path / "n", node={"receivers": 2}, security={"tls": tls}).start(ready="port")
    try:
        serve_pid, child = node.proc.pid, receiver_pids(node)[1]  # type: ignore[union-attr]
        ae = verification_ae()
        owners = set()
        for i in range(40):  # one association per instance (resends after the twelfth) until both took some
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", tls_args=(ctx, "127.0.0.1"))
            assert assoc.is_established
            owners.add(owner_of(assoc, node, [serve_pid, child]))
            assert assoc.send_c_store(series[i % 12]).Status == SUCCESS
            assoc.release()
            if i >= 11 and len(owners) == 2:
                break
        assert owners == {serve_pid, child}
        assert ledger_rows(node, "select count(*) from instances") == [(12,)]
    finally:
        assert node.stop() == 0
