"""`/metrics` and `/healthz` of a real `dicomnode serve`, asked by a real HTTP client.

Specification: the metrics follow a real C-STORE of a generated series through its job (instances, series
and jobs by state, stage durations, deliveries, the loaded model); a rejected association and a refused
instance are counted by reason; `/healthz` is 200 when every check is ok and 503 naming the failing check
when a worker dies, the spool's file system turns read-only or free space falls below the floor; the
listener stops with serve, whatever its clients do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from dicomgen import SeriesSpec, make_series
from netutil import PynetdicomStoreSCP
from nodeproc import NodeProcess, ledger_rows, pynetdicom_send, wait_gone
from tmpfs import mounted_tmpfs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

WORKER = {"processes": 1, "lease_seconds": 300, "poll_seconds": 0.2}
MODEL = {"device": "cpu", "batch_size": 4}


def get(node: NodeProcess, path: str) -> tuple[int, str]:
    return node.http_get(path)


def health(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    code, body = get(node, "/healthz")
    return code, json.loads(body)


def metrics(node: NodeProcess) -> dict[str, float]:
    return node.metrics()


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60, log: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last}\n{log()[-3000:]}")


def wait_health(node: NodeProcess, code: int, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        c, body = health(node)
        return body if c == code else None

    return wait_until(f"/healthz {code}", probe, timeout, node.log)  # type: ignore[no-any-return]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- a node with a worker and a destination


@pytest.fixture(scope="module")
def pacs() -> Iterator[PynetdicomStoreSCP]:
    with PynetdicomStoreSCP(0x0000) as scp:
        yield scp


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: PynetdicomStoreSCP) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path_factory.mktemp("monitored"), [{"ae_title": "STORESCP", "host": "127.0.0.1",
                                                           "port": pacs.port, "name": "pacs"}],
                    worker=WORKER, model=MODEL)
    n.start()
    try:
        wait_health(n, 200, timeout=180)  # the worker has loaded its models
        yield n
    finally:
        n.stop()


def test_healthz_is_200_with_every_check_named_once_the_models_are_loaded(node: NodeProcess) -> None:
    code, body = health(node)
    assert code == 200, body
    assert body["status"] == "ok" and body["failing"] == []
    assert list(body["checks"]) == ["process", "receivers", "ledger", "spool", "disk", "workers", "model"]
    assert all(c["ok"] for c in body["checks"].values())
    assert "1/1 running and ready" in body["checks"]["workers"]["detail"]
    shipped = json.loads((Path(__file__).parents[1] / "ml" / "weights" / "unet-t1-to-t2.json").read_text())
    assert f"t1-to-t2: {shipped['name']}-{shipped['version']}-" in body["checks"]["model"]["detail"]  # the shipped one


def test_metrics_follow_a_stored_series_through_its_job(node: NodeProcess, pacs: PynetdicomStoreSCP) -> None:
    before = metrics(node)
    series = make_series(SeriesSpec(weighting="T1", slices=8))
    assert pynetdicom_send(node.port, series) == [0x0000] * 8
    uid = str(series[0].SeriesInstanceUID)
    job = node.wait_for(lambda s: any(j["source_series_uid"] == uid and j["state"] == "done" for j in s["jobs"]),
                        timeout=120, what="the job done")["jobs"][0]

    def caught_up() -> dict[str, float] | None:  # ledger tallies and folder sizes are cached a few seconds
        m = metrics(node)
        return m if m['dicomnode_jobs{state="done"}'] >= 1 and m["dicomnode_output_bytes"] > 0 else None

    m = wait_until("the done job in /metrics", caught_up, timeout=30, log=node.log)
    stored = 'dicomnode_instances_received_total{outcome="stored"}'
    assert m[stored] - before.get(stored, 0) == 8
    assert m["dicomnode_received_bytes_total"] > 8 * 64 * 64 * 2
    assert m["dicomnode_associations_accepted_total"] >= 1
    assert m["dicomnode_ledger_instances"] >= 8
    assert m['dicomnode_series{state="selected"}'] >= 1
    assert m['dicomnode_jobs{state="done"}'] >= 1 and m['dicomnode_jobs{state="failed"}'] == 0
    for stage in ("waiting", "loading", "inference", "qc", "building", "sending"):  # one finished run, each timed
        assert m[f'dicomnode_stage_duration_seconds_count{{stage="{stage}"}}'] >= 1, stage
        assert m[f'dicomnode_stage_duration_seconds_bucket{{le="+Inf",stage="{stage}"}}'] >= 1, stage
        assert m[f'dicomnode_stage_duration_seconds_sum{{stage="{stage}"}}'] > 0, stage
    assert m['dicomnode_delivery_attempts_total{destination="pacs"}'] >= 8
    assert m['dicomnode_delivery_failures_total{destination="pacs"}'] == 0
    assert len(pacs.received) >= 8
    assert m["dicomnode_ledger_up"] == 1
    assert m["dicomnode_spool_bytes"] > 0 and m["dicomnode_output_bytes"] > 0
    assert m["dicomnode_disk_free_bytes"] > m["dicomnode_disk_free_floor_bytes"] == 512 * 2**20
    assert m["dicomnode_workers"] == m["dicomnode_workers_ready"] == m["dicomnode_workers_configured"] == 1
    model = [k for k in m if k.startswith('dicomnode_model_info{direction="t1-to-t2"')]
    assert len(model) == 1 and m[model[0]] == 1
    shipped = json.loads((REPO / "ml" / "weights" / "unet-t1-to-t2.json").read_text())
    assert f'weights_sha256="{shipped["weights_sha256"]}"' in model[0]
    assert f'name="{shipped["name"]}"' in model[0] and f'version="{shipped["version"]}"' in model[0]
    (recorded,) = ledger_rows(node, "select model_identity from jobs where state = 'done'")
    assert f'identity="{recorded[0]}"' in model[0]  # what the built series were made with
    assert job["state"] == "done"


def test_a_rejected_association_and_a_refused_instance_are_counted_by_reason(node: NodeProcess) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    before = metrics(node)
    ae = AE(ae_title="INTRUDER")  # not in security.allowed_calling_aets
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    series = make_series(SeriesSpec(weighting="T2", slices=4))
    assert pynetdicom_send(node.port, series[:1]) == [0x0000]
    other = series[0].copy()
    other.PixelData = bytes(len(other.PixelData))  # same SOP Instance UID, other content: refused 0xC231
    assert pynetdicom_send(node.port, [other]) == [0xC231]

    reason = 'dicomnode_associations_rejected_total{reason="calling_aet_not_allowed"}'
    refused = 'dicomnode_instances_rejected_total{status="0xC231"}'
    m = wait_until("the refused instance in /metrics",
                   lambda: (lambda m: m if m.get(refused, 0) >= 1 else None)(metrics(node)), timeout=30, log=node.log)
    assert m[reason] - before[reason] == 1
    assert m['dicomnode_associations_rejected_total{reason="association_limit"}'] == 0
    assert m['dicomnode_instances_received_total{outcome="rejected"}'] - before.get(
        'dicomnode_instances_received_total{outcome="rejected"}', 0) == 1
    assert m[refused] - before.get(refused, 0) == 1


def test_healthz_names_a_dead_worker_until_its_successor_is_ready(node: NodeProcess) -> None:
    (pid,) = node.worker_pids()
    os.kill(pid, signal.SIGKILL)
    body = wait_health(node, 503, timeout=30)
    assert "workers" in body["failing"] and "process" not in body["failing"], body
    assert f"pid {pid}" in body["checks"]["workers"]["detail"] or "exit code -9" in body["checks"]["workers"]["detail"]
    wait_gone([pid])
    body = wait_health(node, 200, timeout=120)  # serve restarted it and it loaded its models
    assert node.worker_pids() != [pid]
    assert metrics(node)["dicomnode_worker_restarts_total"] >= 1


# ---------------------------------------------------------------- a receive-only node on a file system of its own


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "node" / "var" / "spool", 32) as spool:
        yield spool


def test_healthz_names_a_read_only_spool_and_a_disk_below_the_floor(tmp_path: Path, small_disk: Path) -> None:
    node = NodeProcess(tmp_path / "node", storage={"min_free_mb": 8}).start()
    try:
        wait_health(node, 200)
        st = os.statvfs(small_disk)
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4 * 2**20))  # 4 MB left: below the 8 MB floor
        body = wait_health(node, 503)
        assert body["failing"] == ["disk"], body
        assert "below storage.min_free_mb = 8" in body["checks"]["disk"]["detail"]
        filler.unlink()
        wait_health(node, 200)

        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        try:
            body = wait_health(node, 503)
            assert body["failing"] == ["spool"], body
            assert "not writable: Read-only file system" in body["checks"]["spool"]["detail"]
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        wait_health(node, 200)
    finally:
        node.stop()


# ---------------------------------------------------------------- the listener itself


def test_the_listener_holds_no_thread_for_stalled_clients_and_stops_with_serve(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node").start()
    http_port = node.sections["http"]["port"]
    stalled = []
    try:
        for _ in range(10):  # more than the listener's threads, each stopped mid-request
            s = socket.create_connection(("127.0.0.1", http_port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        assert health(node)[0] == 200  # answered all the same
        assert get(node, "/nope")[0] == 404
        big = socket.create_connection(("127.0.0.1", http_port), timeout=5)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert big.recv(200).split(b"\r\n")[0].split(b" ")[1] == b"431"  # Request Header Fields Too Large
        big.close()
        body = socket.create_connection(("127.0.0.1", http_port), timeout=5)
        body.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert body.recv(200).split(b"\r\n")[0].split(b" ")[1] == b"413"  # refused before it is read
        body.close()
        assert get(node, "/healthz")[0] == 200
    finally:
        t0 = time.monotonic()
        rc = node.stop()
        took = time.monotonic() - t0
        for s in stalled:
            s.close()
    assert rc == 0 and took < 30, (rc, took)
    assert not listening(http_port)  # nothing left listening


def test_healthz_says_stopping_while_serve_shuts_down(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = NodeProcess(tmp_path / "node", node={"dimse_timeout": 4}).start()  # shutdown waits for it, at most
    ae = AE(ae_title="SENDER1")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")  # in flight: serve gives it dimse_timeout
    assert held.is_established
    try:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        body = wait_health(node, 503, timeout=10)
        assert body["failing"] == ["process"] and "is stopping" in body["checks"]["process"]["detail"], body
        assert node.proc.wait(60) == 0
    finally:
        held.abort()
        node.stop()
    assert not listening(node.sections["http"]["port"])


def test_an_http_port_in_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        node = NodeProcess(tmp_path, http={"port": port})
        res = node.cli("serve", check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"dicomnode: cannot start: Address already in use (http.host:http.port = 127.0.0.1:{port})"]
    assert not (tmp_path / "var").exists()  # checked before anything is created


def test_http_keys_are_checked_and_named(tmp_path: Path) -> None:
    from dicom_node.config import ConfigError, parse_config

    base = {"security": {"allow_any_calling_aet": True}}
    cfg = parse_config(base, tmp_path / "c.toml")
    assert (cfg.http.enabled, cfg.http.host, cfg.http.port) == (True, "127.0.0.1", 11180)
    for bad, message in (({"port": 70000}, "http.port: port must be 0-65535"),
                         ({"enabled": "yes"}, "http.enabled: expected true or false"),
                         ({"bind": "x"}, "http.bind: unknown key"),
                         ({"port": 11112}, "http.port: is node.port (11112) too")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**base, "http": bad}, tmp_path / "c.toml")
