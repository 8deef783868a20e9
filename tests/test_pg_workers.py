"""Many workers, one PostgreSQL ledger: the multi-machine layout on one machine.

One ``dicomnode serve`` receives (it runs no worker of its own); separate
``dicomnode worker`` processes, each with its own config file, share its
ledger (a real PostgreSQL server) and its storage folder, as workers on other
machines would over a shared file system.  The destination is a real Storage
SCP on loopback that counts every C-STORE it answers.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import select

from dicomgen import SeriesSpec, make_series, write_series
from netutil import PynetdicomStoreSCP, needs_dcmtk, storescu
from nodeproc import NodeProcess
from storage.ledger import InstanceRecord, Ledger, utcnow
from storage.models import Job
from workerproc import WorkerProcess

pytestmark = [needs_dcmtk, pytest.mark.slow]

FAST: dict[str, dict[str, Any]] = {"series": {"quiet_seconds": 1.0, "min_slices": 4},
        "delivery": {"backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0, "max_attempts": 5,
                     "timeout_seconds": 10.0},
        "model": {"device": "cpu", "batch_size": 4},
        "security": {"allowed_calling_aets": ["STORESCU", "ECHOSCU"]}}


def sections(storage: Path, ledger_url: str, *, lease: float, **over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
    out["storage"] = {"dir": str(storage), "ledger_url": ledger_url}
    out["worker"] = {"processes": 0, "lease_seconds": lease, "poll_seconds": 0.2}
    for k, v in over.items():
        out.setdefault(k, {}).update(v)
    return out


class Site:
    """serve + N workers + one destination, all torn down at the end."""

    def __init__(self, folder: Path, ledger_url: str, pacs: PynetdicomStoreSCP, workers: int, *, lease: float,
                 **over: dict[str, Any]) -> None:
        storage = folder / "shared"
        dest = [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}]
        self.node = NodeProcess(folder / "serve", destinations=dest, **sections(storage, ledger_url, lease=lease, **over))
        self.workers = [WorkerProcess(folder / f"worker-{i}", sections(storage, ledger_url, lease=lease, **over), dest)
                        for i in range(workers)]
        self.ledger_url = ledger_url
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.ledger_url, read_only=True)
        return self._ledger

    def start(self) -> "Site":
        try:
            for w in self.workers:  # first: they create the ledger together with serve (see test_ledger_concurrency)
                w.start()
            self.node.start()
            for w in self.workers:
                w.wait_polling()
        except BaseException:
            self.stop()  # a site that did not come up leaves nothing running
            raise
        return self

    def stop(self) -> None:
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.stop()
        self.node.stop()
        if self._ledger is not None:
            self._ledger.close()

    def jobs(self, uids: list[str]) -> list[Job]:
        """The jobs of these source series, read from the ledger (quicker than ``dicomnode status``)."""
        with self.ledger.session() as s:
            return list(s.scalars(select(Job).where(Job.source_series_uid.in_(uids)).order_by(Job.id)))

    def wait_jobs(self, uids: list[str], done: Callable[[list[Job]], bool], what: str, timeout: float = 90,
                  interval: float = 0.05) -> list[Job]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(uids)
            if done(jobs):
                return jobs
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}: {[(j.id, j.state, j.worker) for j in self.jobs(uids)]}"
                             f"\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {w.folder.name}\n{w.log()[-2500:]}" for w in self.workers)


@pytest.fixture
def pacs() -> Iterator[PynetdicomStoreSCP]:
    with PynetdicomStoreSCP(ae_title="PACS") as scp:
        yield scp


def send(node: NodeProcess, folder: Path, *, slices: int, size: int, seed: int) -> str:
    t1 = make_series(SeriesSpec(weighting="T1", slices=slices, rows=size, cols=size, seed=seed))
    res = storescu(node.port, write_series(t1, folder))
    assert res.returncode == 0, res.stderr
    return str(t1[0].SeriesInstanceUID)


def all_done(n: int) -> Callable[[list[Job]], bool]:
    return lambda jobs: len(jobs) == n and all(j.state == "done" for j in jobs)


def test_three_workers_share_a_burst_and_every_series_is_delivered_once(tmp_path: Path, postgres: Any,
                                                                         pacs: PynetdicomStoreSCP) -> None:
    site = Site(tmp_path, postgres.create_database(), pacs, workers=3, lease=10).start()
    try:
        uids = [send(site.node, tmp_path / f"in-{i}", slices=6, size=64, seed=i) for i in range(6)]
        jobs = site.wait_jobs(uids, all_done(6), "six jobs done")
        assert sorted(j.source_series_uid for j in jobs) == sorted(uids)  # one job per source series
        assert len({j.worker for j in jobs}) >= 2, site.logs()  # the burst was shared
        assert [j.runs for j in jobs] == [1] * 6  # no job was taken twice
        assert len(pacs.received) == 6 * 6 and len(set(pacs.received)) == 6 * 6  # every instance once, no duplicate
    finally:
        site.stop()


# A job long enough to be caught running: torch eager (see test_processes.SLOW_JOB) on a mid-sized series.
SLOW_JOB: dict[str, dict[str, Any]] = {"model": {"engine": "torch"}}


def test_a_worker_killed_mid_job_loses_its_lease_to_another_worker(tmp_path: Path, postgres: Any,
                                                                    pacs: PynetdicomStoreSCP) -> None:
    """On another machine nobody can see the dead worker's PID: only its lease running out frees its job.

    ``serve`` is stopped once the job is queued, so that its check of local PIDs cannot free it either.
    """
    site = Site(tmp_path, postgres.create_database(), pacs, workers=2, lease=2, **SLOW_JOB).start()
    try:
        uid = send(site.node, tmp_path / "in", slices=16, size=192, seed=1)
        site.wait_jobs([uid], lambda jobs: len(jobs) == 1, "the job queued")
        site.node.stop()
        (running,) = site.wait_jobs([uid], lambda jobs: jobs[0].state == "running", "the job running")
        (victim,) = [w for w in site.workers if (running.worker or "").endswith(f":{w.pid}")]
        victim.kill9()
        (job,) = site.wait_jobs([uid], all_done(1), "the job done by the other worker")
        assert job.worker != running.worker and job.runs == 2, site.logs()
        assert len(pacs.received) == 16 and len(set(pacs.received)) == 16  # one synthetic series, no duplicate
    finally:
        site.stop()


def test_a_worker_rides_out_a_restart_of_the_database(tmp_path: Path, own_postgres: Any) -> None:
    """The ledger is on another machine: while it is unreachable an idle worker waits, then claims jobs again."""
    url = own_postgres.create_database()
    storage = tmp_path / "shared"
    w = WorkerProcess(tmp_path / "worker", sections(storage, url, lease=10)).start()
    try:
        w.wait_polling()
        own_postgres.pause()
        time.sleep(2.0)  # ten polls or so against a closed port
        own_postgres.resume()
        led = Ledger(url)
        try:  # a job whose instances are not in the spool: the worker that claims it fails it with that reason
            led.record_instance(InstanceRecord("1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.3.4",
                                               "1.2.840.10008.1.2.1", "1.2.3/1.2.3.4/1.2.3.4.1.dcm", 10, "STORESCU",
                                               "MR", "t1", {}))
            (due,) = led.due_series(0, None, now=utcnow() + timedelta(seconds=1))
            jid = led.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
            assert isinstance(jid, int)
            deadline = time.monotonic() + 30
            while (job := led.job(jid)) is not None and job.state != "failed":
                assert w.proc is not None and w.proc.poll() is None, f"the worker exited:\n{w.log()[-3000:]}"
                assert time.monotonic() < deadline, w.log()[-3000:]
                time.sleep(0.1)
            assert job is not None and (job.worker or "").endswith(f":{w.pid}") and "missing" in (job.error or "")
        finally:
            led.close()
        assert "ledger unreachable" in w.log()
    finally:
        w.stop()
