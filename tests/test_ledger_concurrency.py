"""The ledger shared by many processes on many machines: the same outcome on SQLite and on a real PostgreSQL.

PostgreSQL runs transactions in READ COMMITTED and enforces column widths; SQLite
serialises every writer and stores any length.  These tests hold the ledger to
one behaviour on both.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import event

from storage.db import schema_head
from storage.ledger import InstanceRecord, Ledger, utcnow, worker_name


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres").create_database())


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    led = Ledger(url)
    yield led
    led.close()


def rec(sop: str, series: str = "1.2.3", **over: Any) -> InstanceRecord:
    values: dict[str, Any] = dict(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid="1.2",
                                  series_uid=series, transfer_syntax="1.2.840.10008.1.2.1",
                                  path=f"1.2/{series}/{sop}.dcm", size_bytes=10, calling_aet="A", modality="MR",
                                  description="t1", attrs={})
    values.update(over)
    return InstanceRecord(**values)


def _open(url: str, barrier: Any, out: "mp.Queue[str]") -> None:
    barrier.wait(30)
    try:
        Ledger(url).close()
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what went wrong
        out.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_workers_starting_at_once_on_a_new_ledger_all_open_it(url: str) -> None:
    """Machines booting together: every process creates-or-migrates the same empty database at the same moment."""
    ctx = mp.get_context("spawn")
    n = 4
    barrier = ctx.Barrier(n)
    out: mp.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(url, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * n
    led = Ledger(url)
    assert led.schema_version == schema_head()
    led.close()


def test_a_worker_on_a_host_with_a_long_name_claims_and_finishes_jobs(ledger: Ledger) -> None:
    host = "gpu-worker-01." + "radiology." * 6 + "hospital.example.org"  # a fully qualified name, 94 characters
    name = worker_name(host, 4194304)
    ledger.record_instance(rec("1.1"))
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    jid = ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
    job = ledger.claim_job(name, 60)
    assert job is not None and job.id == jid
    assert ledger.release_leases(host, alive=lambda w: False) == 1  # found again by its host's name
    again = ledger.claim_job(name, 60)
    assert again is not None and ledger.job_done(jid, name, {})


def test_hosts_whose_long_names_share_a_prefix_get_different_worker_names() -> None:
    a, b = "x" * 70 + ".a.example.org", "x" * 70 + ".b.example.org"
    assert worker_name(a, 7) != worker_name(b, 7)
    assert len(worker_name(a, 4194304)) <= 64
    assert worker_name("short", 12) == "short:12"


def test_a_local_lease_check_never_releases_another_hosts_job(ledger: Ledger) -> None:
    """``serve`` on host ``gpu_1`` frees the jobs of dead local PIDs only; ``gpux1`` is another machine."""
    ledger.record_instance(rec("1.1"))
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
    assert ledger.claim_job(worker_name("gpux1", 4242), 60) is not None
    assert ledger.release_leases("gpu_1", alive=lambda w: False) == 0


def _queue_generation(ledger: Ledger, sop: str) -> int:
    ledger.record_instance(rec(sop, series="1.3.77"))
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    jid = ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
    assert isinstance(jid, int)
    return jid


def test_two_generations_of_a_series_finishing_at_the_same_moment_leave_one_done(ledger: Ledger) -> None:
    """Two workers end the jobs of generations 1 and 2 of one series at once: the older one is superseded.

    Generation 1's worker is held between its last statement and its commit while generation 2's worker
    finishes (at most 3 s: a ledger that makes the second wait for the first lets it go on after that).
    """
    g1 = _queue_generation(ledger, "1.9.1")
    assert ledger.claim_job("w1", 60) is not None
    g2 = _queue_generation(ledger, "1.9.2")  # a late instance reopened the series
    assert ledger.claim_job("w2", 60) is not None
    second_done = threading.Event()
    first = threading.current_thread()
    held: list[bool] = []

    def finish_second() -> None:
        ledger.job_done(g2, "w2", {})
        second_done.set()

    def hold_first_commit(_session: object) -> None:
        if threading.current_thread() is first and not held:
            held.append(True)
            threading.Thread(target=finish_second).start()
            second_done.wait(3)

    event.listen(ledger._session, "before_commit", hold_first_commit)
    try:
        assert ledger.job_done(g1, "w1", {})
    finally:
        event.remove(ledger._session, "before_commit", hold_first_commit)
    assert second_done.wait(30)
    jobs = {j.id: j for j in ledger.status().jobs}
    assert (jobs[g1].state, jobs[g2].state) == ("superseded", "done")


def test_values_wider_than_their_columns_are_kept_on_postgresql_as_on_sqlite(ledger: Ledger) -> None:
    """A sender's over-long Modality (CS: 16 characters at most) must not turn into a failure to store."""
    out = ledger.record_instance(rec("1.4.1", series="1.4", modality="MR" * 12, description="d" * 300))
    assert not out.duplicate
    (series,) = ledger.status().series
    assert series.instances == 1
