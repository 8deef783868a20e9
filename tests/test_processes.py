"""Worker processes and crashes: workers never outlive serve, dead workers' jobs resume at once.

Real processes throughout: ``dicomnode serve`` with its worker processes, real
signals (SIGKILL, SIGSTOP), a real zombie.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomgen import SeriesSpec, make_series, write_series
from dicom_node.serve import pid_alive
from netutil import needs_dcmtk, storescu
from nodeproc import NodeProcess, freeze_outside_ledger_write, wait_gone

pytestmark = [needs_dcmtk, pytest.mark.slow]

WORKER = {"processes": 1, "lease_seconds": 300, "poll_seconds": 0.2}


def start(folder: Path, **over: dict) -> NodeProcess:
    sections = {"worker": dict(WORKER), "model": {"device": "cpu", "batch_size": 4},
                "series": {"quiet_seconds": 1.0, "min_slices": 4}}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return NodeProcess(folder, **sections).start()


def send_t1(node: NodeProcess, folder: Path, slices: int = 24, size: int = 160) -> str:
    t1 = make_series(SeriesSpec(weighting="T1", slices=slices, rows=size, cols=size))
    res = storescu(node.port, write_series(t1, folder))
    assert res.returncode == 0, res.stderr
    return str(t1[0].SeriesInstanceUID)


# A job that lasts long enough to be caught "running" and killed there: torch eager (ONNX Runtime
# finishes a small series in half a second) on a larger series.
SLOW_JOB = {"model": {"engine": "torch"}}


def send_long_t1(node: NodeProcess, folder: Path) -> str:
    return send_t1(node, folder, slices=48, size=256)


def job(node: NodeProcess, uid: str, states: tuple[str, ...], timeout: float) -> dict:
    st = node.wait_for(lambda s: any(j["source_series_uid"] == uid and j["state"] in states for j in s["jobs"]),
                       timeout=timeout, what=f"job of {uid} in {states}")
    return next(j for j in st["jobs"] if j["source_series_uid"] == uid)


def test_workers_exit_when_serve_is_killed_and_a_restart_runs_no_more_than_configured(tmp_path: Path) -> None:
    node = start(tmp_path / "n")
    try:
        (worker,) = node.wait_for_workers(1)
        node.kill9_serve()  # serve alone: the worker is orphaned
        wait_gone([worker], timeout=15)  # it noticed and stopped by itself
        node.start()
        (new,) = node.wait_for_workers(1, exclude=(worker,))
        time.sleep(1.0)
        assert node.worker_pids() == [new]
    finally:
        node.stop()


def test_a_job_running_when_serve_is_killed_is_resumed_at_once_by_the_restarted_node(tmp_path: Path) -> None:
    node = start(tmp_path / "n", **SLOW_JOB)  # lease_seconds = 300: waiting out the lease would time the test out
    try:
        uid = send_long_t1(node, tmp_path / "t1")
        job(node, uid, ("running",), timeout=60)
        (worker,) = node.kill9_serve()
        wait_gone([worker], timeout=15)
        node.start()
        done = job(node, uid, ("done",), timeout=120)
        assert not done["worker"].endswith(f":{worker}")
    finally:
        node.stop()


def test_a_restart_waits_for_a_stray_worker_of_the_same_storage_folder(tmp_path: Path) -> None:
    node = start(tmp_path / "n")
    try:
        (stray,) = node.wait_for_workers(1)
        freeze_outside_ledger_write(node, stray)  # a stuck worker: it cannot react to its parent's death yet
        node.kill9_serve()
        node.start()
        node.wait_for(lambda s: "still held by worker pid" in node.log(), what="new worker waiting for the slot")
        assert node.worker_pids() == [stray]  # the new node added no second worker
        os.kill(stray, signal.SIGCONT)  # it wakes up, sees it is orphaned and exits
        wait_gone([stray], timeout=15)
        (new,) = node.wait_for_workers(1, exclude=(stray,))
        assert new != stray
    finally:
        try:
            os.kill(stray, signal.SIGCONT)
        except (ProcessLookupError, UnboundLocalError):
            pass
        node.stop()


def test_a_worker_killed_mid_job_is_reaped_and_its_job_resumed_at_once(tmp_path: Path) -> None:
    node = start(tmp_path / "n", **SLOW_JOB)
    try:
        uid = send_long_t1(node, tmp_path / "t1")
        running = job(node, uid, ("running",), timeout=60)
        (worker,) = node.worker_pids()
        assert running["worker"].endswith(f":{worker}")
        os.kill(worker, signal.SIGKILL)  # serve must reap it, not wait out its 300 s lease
        wait_gone([worker])
        done = job(node, uid, ("done",), timeout=120)
        assert not done["worker"].endswith(f":{worker}")
        assert "resuming its job" in node.log()
    finally:
        node.stop()


def test_a_zombie_counts_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        os.kill(child.pid, 0)  # the old check: a zombie still "exists"
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait()
    assert not pid_alive(child.pid)
