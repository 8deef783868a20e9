"""Ledger semantics: idempotent instances, conditional completion, atomic job claims, leases, migration."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest

from storage.db import LedgerError, schema_head
from storage.ledger import InstanceRecord, Ledger, utcnow


def rec(sop: str, series: str = "1.2.3", study: str = "1.2") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_uid=study,
                          series_uid=series, transfer_syntax="1.2.840.10008.1.2.1", path=f"{study}/{series}/{sop}.dcm",
                          size_bytes=10, calling_aet="A", modality="MR", description="t1", attrs={})


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """The same semantics on both databases: SQLite (one machine) and a real PostgreSQL server (many)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database()
    led = Ledger(url)
    yield led
    led.close()


def queue_jobs(ledger: Ledger, n: int) -> list[int]:
    ids = []
    for i in range(n):
        ledger.record_instance(rec(f"1.9.{i}", series=f"1.3.{i}"))
    for due in ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1)):
        ids.append(ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2"))
    return ids


def test_instances_are_unique_and_a_resend_is_not_counted(ledger: Ledger) -> None:
    a = ledger.record_instance(rec("1.1"))
    b = ledger.record_instance(rec("1.1"))
    assert not a.duplicate and b.duplicate
    assert ledger.status().series[0].instances == 1


def test_completion_loses_to_a_newer_instance(ledger: Ledger) -> None:
    ledger.record_instance(rec("1.1"))
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    ledger.record_instance(rec("1.2"))  # arrives between the check and the hand-on
    assert ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2") is False
    (due2,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    assert due2.instances == 2
    assert isinstance(ledger.complete_series(due2, classification="T1", reason="r", direction="t1-to-t2"), int)


def _claim_all(url: str, name: str, out: "mp.Queue[tuple[str, int]]") -> None:
    led = Ledger(url)
    while (job := led.claim_job(name, 60)) is not None:
        out.put((name, job.id))
        led.job_done(job.id, name, {})
    led.close()


def test_concurrent_workers_never_take_the_same_job(ledger: Ledger) -> None:
    ids = queue_jobs(ledger, 30)
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(ledger.url, f"w{i}", q)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    claims = [q.get(timeout=5) for _ in range(q.qsize())] if hasattr(q, "qsize") else []
    claimed = [jid for _, jid in claims]
    assert sorted(claimed) == sorted(ids)  # every job exactly once
    assert {j.state for j in ledger.status(limit=100).jobs} == {"done"}


def test_a_dead_workers_job_is_taken_over_after_its_lease(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    first = ledger.claim_job("host:1", lease_seconds=30)
    assert first is not None and first.id == jid
    assert ledger.claim_job("host:2", 30) is None  # lease still valid
    later = utcnow() + timedelta(seconds=31)
    taken = ledger.claim_job("host:2", 30, now=later)
    assert taken is not None and taken.id == jid and taken.runs == 2
    assert not ledger.job_done(jid, "host:1", {})  # the old owner can no longer write
    assert ledger.job_done(jid, "host:2", {})


def test_release_of_dead_local_workers(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    assert ledger.claim_job("thishost:999999", 300) is not None
    assert ledger.release_leases("thishost", alive=lambda w: False) == 1
    again = ledger.claim_job("thishost:1", 300)
    assert again is not None and again.id == jid


def test_retry_requeues_a_failed_job_only(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    ledger.claim_job("w", 60)
    with pytest.raises(ValueError, match="running"):
        ledger.retry_job(jid, resend=False)
    ledger.job_failed(jid, "w", "PACS said no", {"sending": 3.0})
    assert ledger.retry_job(jid, resend=False).previous_state == "failed"
    job = ledger.status().jobs[0]
    assert job.state == "queued" and job.timings == {} and job.attempts == 0
    assert job.previous_runs[0].state == "failed" and job.previous_runs[0].timings == {"sending": 3.0}
    with pytest.raises(KeyError):
        ledger.retry_job(999, resend=False)


def test_a_done_job_is_retried_only_when_forced(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    ledger.claim_job("w", 60)
    ledger.job_done(jid, "w", {})
    with pytest.raises(ValueError, match="--force"):
        ledger.retry_job(jid, resend=True)
    assert ledger.retry_job(jid, resend=True, force=True).previous_state == "done"
    assert ledger.status().jobs[0].state == "delivering"


def test_schema_version_is_kept_and_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    assert Ledger(url).schema_version == schema_head()
    assert Ledger(url).schema_version == schema_head()  # reopening migrates nothing
    con = sqlite3.connect(tmp_path / "l.db")
    con.execute("update meta set value = '99' where key = 'schema_version'")
    con.commit()
    with pytest.raises(LedgerError, match="newer"):
        Ledger(url)


def test_a_ledger_kept_write_locked_by_another_process_is_named_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    Ledger(url).close()
    holder = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # e.g. a process stopped in the middle of a transaction
    try:
        with caplog.at_level("WARNING", logger="storage.db"), pytest.raises(LedgerError, match="write-locked"):
            Ledger(url, busy_timeout=0.5)
        assert "waiting up to 0 s" in caplog.text or "waiting up to 1 s" in caplog.text
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert Ledger(url, busy_timeout=0.5).schema_version == schema_head()  # free again: opens at once


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    Ledger(f"sqlite:///{tmp_path / 'ledger.db'}").close()
    con = sqlite3.connect(tmp_path / "ledger.db")
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_new_instances_resends_and_a_reopened_series_are_counted_right(ledger: Ledger) -> None:
    """The two-statement path for a receiving series must agree with the full path in every case."""
    for i in range(5):
        assert ledger.record_instance(rec(f"1.5.{i}")).generation == 1
    assert ledger.record_instance(rec("1.5.2")).duplicate  # a resend: rolled back, then the full path
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    assert due.instances == 5
    ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
    late = ledger.record_instance(rec("1.5.9"))  # the series was handed on: it reopens
    assert late.reopened and late.generation == 2
    again = ledger.record_instance(rec("1.5.10"))  # receiving again: the short path once more
    assert not again.reopened and again.generation == 2
    assert ledger.status().series[0].instances == 7


def test_serve_folds_the_wal_back_itself(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bg.db'}"
    led = Ledger(url, background_checkpoints=True)
    with led.engine.connect() as c:
        assert c.exec_driver_sql("pragma wal_autocheckpoint").scalar() == 10000
    for i in range(50):
        led.record_instance(rec(f"1.6.{i}"))
    frames, done = led.checkpoint()
    assert frames > 0 and done == frames  # every committed transaction folded back
    assert led.checkpoint() == (frames, frames)  # nothing new since
    led.record_instance(rec("1.6.50"))
    frames2, done2 = led.checkpoint()
    assert done2 == frames2 > 0
    assert led.status().series[0].instances == 51
    led.close()


def _job_of_generation(ledger: Ledger, sop: str) -> int:
    ledger.record_instance(rec(sop, series="1.3.77"))
    (due,) = ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
    jid = ledger.complete_series(due, classification="T1", reason="r", direction="t1-to-t2")
    assert isinstance(jid, int)
    return jid


def test_a_finished_later_generation_supersedes_the_earlier_job_whichever_finishes_first(ledger: Ledger) -> None:
    g1 = _job_of_generation(ledger, "1.9.1")
    assert ledger.claim_job("w1", 60) is not None  # generation 1 runs...
    g2 = _job_of_generation(ledger, "1.9.2")  # ...while a late instance reopens the series
    claimed = ledger.claim_job("w2", 60)
    assert claimed is not None and claimed.id == g2 and claimed.generation == 2
    assert ledger.job_done(g2, "w2", {})
    assert ledger.job_done(g1, "w1", {})  # the older job finishes last
    jobs = {j.id: j for j in ledger.status().jobs}
    assert jobs[g2].state == "done"
    assert jobs[g1].state == "superseded" and f"superseded by job {g2}" in (jobs[g1].error or "")
    g3 = _job_of_generation(ledger, "1.9.3")
    assert ledger.claim_job("w3", 60) is not None and ledger.job_done(g3, "w3", {})
    jobs = {j.id: j for j in ledger.status().jobs}
    assert [jobs[i].state for i in (g1, g2, g3)] == ["superseded", "superseded", "done"]


def test_a_worker_claims_only_jobs_of_the_directions_it_can_run_except_built_ones(ledger: Ledger) -> None:
    from vocab import Direction

    (jid,) = queue_jobs(ledger, 1)  # a t1-to-t2 job
    assert ledger.claim_job("host:1", 30, directions=[Direction.T2_TO_T1]) is None
    assert ledger.claim_job("host:1", 30, directions=[]) is None
    job = ledger.claim_job("host:2", 30, directions=[Direction.T1_TO_T2])
    assert job is not None and job.id == jid
    assert ledger.job_built(jid, "host:2", output_dir="out/job-1", output_series_uid="1.2.9", output_instances=8,
                            model_identity="m", timings={})
    later = utcnow() + timedelta(seconds=31)  # host:2 died after building: delivering needs no model
    taken = ledger.claim_job("host:1", 30, now=later, directions=[])
    assert taken is not None and taken.id == jid and taken.state.value == "delivering"
