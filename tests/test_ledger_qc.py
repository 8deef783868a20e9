"""The ledger's side of quality control: one QC row per job, the held state, release, and what treats held
as unfinished (no worker claims it, a newer job supersedes it, retry resends it, older ledgers get the table)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage.ledger import Ledger
from test_ledger import _job_of_generation, queue_jobs
from vocab import ACTIVE_JOB_STATES, STATUS_FILTERS, UNFINISHED_JOB_STATES, JobState

CHECKS = {"intensity_histogram": {"value": 0.64, "threshold": "warn > 0.075, fail > 0.15", "verdict": "fail",
                                  "reason": "input intensities unlike the training data"}}


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


def build_held(ledger: Ledger, jid: int, worker: str = "w") -> None:
    claimed = ledger.claim_job(worker, 60)
    assert claimed is not None and claimed.id == jid
    ledger.record_qc(jid, verdict="fail", reasons=["input intensities unlike the training data"], checks=CHECKS,
                     model_identity="tiny-1-abc")
    assert ledger.job_built(jid, worker, output_dir="/out", output_series_uid="1.2.9", output_instances=3,
                            model_identity="tiny-1-abc", timings={"qc": 0.2}, held=True)


def test_held_is_a_job_state_that_status_filters_by_and_that_is_unfinished_but_not_active() -> None:
    assert JobState.HELD.value == "held" and "held" in STATUS_FILTERS
    assert "held" not in ACTIVE_JOB_STATES and set(ACTIVE_JOB_STATES) < set(UNFINISHED_JOB_STATES)
    assert "held" in UNFINISHED_JOB_STATES


def test_a_held_job_keeps_its_qc_row_and_no_worker_takes_it(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    build_held(ledger, jid)
    assert ledger.claim_job("other", 60) is None
    assert ledger.release_own("w") == 0  # a stopping worker hands nothing back: the job is not running
    (job,) = ledger.status(state="held").jobs
    assert job.state == "held" and job.output_series_uid == "1.2.9"
    assert job.qc is not None and job.qc.verdict == "fail" and job.qc.checks == CHECKS
    assert job.qc.reasons == ("input intensities unlike the training data",) and job.qc.model_identity == "tiny-1-abc"
    assert job.qc.released_at is None


def test_release_hands_a_held_job_to_delivery_once(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    build_held(ledger, jid)
    ledger.release_job(jid)
    claimed = ledger.claim_job("w2", 60)
    assert claimed is not None and claimed.id == jid and claimed.state is JobState.DELIVERING
    assert ledger.qc_released(jid)
    with pytest.raises(ValueError, match=f"job {jid} is delivering, not held"):
        ledger.release_job(jid)
    with pytest.raises(KeyError, match="no job 999"):
        ledger.release_job(999)
    # a new synthesis of the same job replaces its QC row and keeps the release
    ledger.record_qc(jid, verdict="warn", reasons=["r"], checks={}, model_identity="m")
    (job,) = ledger.status().jobs
    assert job.qc is not None and job.qc.verdict == "warn" and job.qc.released_at is not None


def test_retry_resends_a_held_job_and_keeps_the_held_run(ledger: Ledger) -> None:
    (jid,) = queue_jobs(ledger, 1)
    build_held(ledger, jid)
    assert ledger.retry_job(jid, resend=True).previous_state == "held"
    (job,) = ledger.status().jobs
    assert job.state == "delivering" and [r.state for r in job.previous_runs] == ["held"]


def test_a_newer_generation_that_finishes_supersedes_a_held_older_job(ledger: Ledger) -> None:
    g1 = _job_of_generation(ledger, "1.9.1")
    build_held(ledger, g1)
    g2 = _job_of_generation(ledger, "1.9.2")
    assert ledger.claim_job("w2", 60) is not None and ledger.job_done(g2, "w2", {})
    jobs = {j.id: j for j in ledger.status().jobs}
    assert jobs[g1].state == "superseded" and f"superseded by job {g2}" in (jobs[g1].error or "")
    with pytest.raises(ValueError, match="superseded, not held"):
        ledger.release_job(g1)


def test_a_ledger_from_before_qc_gets_the_table_and_reads_without_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    led = Ledger(url)
    (jid,) = queue_jobs(led, 1)
    led.close()
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.execute("DROP TABLE qc_results")  # as a ledger written before QC came in (schema v2)
    con.execute("UPDATE alembic_version SET version_num = '0002'")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    old = Ledger(url, read_only=True)
    assert old.status().jobs[0].qc is None  # status of an older ledger: no QC yet
    old.close()
    led = Ledger(url)  # serve/worker: the ledger is migrated, the table is created
    assert led.schema_version >= 3
    led.record_qc(jid, verdict="pass", reasons=[], checks={}, model_identity=None)
    assert led.status().jobs[0].qc is not None
