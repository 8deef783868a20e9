"""Ledger tallies for /metrics: counts by state, and stage durations of finished runs only.

Specification: a stage histogram counts a run once its job has ended (done, failed, superseded), never the
partial timings of a job still running; a run that `dicomnode retry` moves to the job's earlier runs is
still counted once (buckets only grow); a duration equal to a bucket's bound falls in that bucket.
Real SQLite ledgers through the real ledger API.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from storage.ledger import Ledger, utcnow
from storage.ledger.tallies import histogram
from test_ledger import queue_jobs

STAGES = ("waiting", "loading", "sending")
BOUNDS = (0.1, 1.0, 10.0)


def counts(ledger: Ledger) -> dict[str, int]:
    return {s: h.count for s, h in ledger.tallies(STAGES, BOUNDS).stages.items()}


def test_a_bound_is_inclusive_and_unknown_stages_are_left_out() -> None:
    h = histogram([("loading", 1.0), ("loading", 1.5), ("loading", 99.0), ("other", 3.0)], ["loading"], [1.0, 2.0])
    assert h["loading"].cumulative() == [("1.0", 1), ("2.0", 2), ("+Inf", 3)]
    assert h["loading"].total == 101.5 and list(h) == ["loading"]


def test_stage_durations_count_finished_runs_once(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    reader = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", read_only=True)  # as /metrics reads it
    first, second = queue_jobs(ledger, 2)
    a = ledger.claim_job("w:1", 60)
    b = ledger.claim_job("w:1", 60)
    assert a is not None and b is not None and {a.id, b.id} == {first, second}
    ledger.job_running(a.id, "w:1", {"waiting": 0.05, "loading": 2.0})
    ledger.job_running(b.id, "w:1", {"waiting": 0.5})
    assert counts(reader) == {"waiting": 0, "loading": 0, "sending": 0}  # both still running

    ledger.job_done(a.id, "w:1", {"waiting": 0.05, "loading": 2.0, "sending": 0.3})
    ledger.job_failed(b.id, "w:1", "no", {"waiting": 0.5, "loading": 20.0})
    t = reader.tallies(STAGES, BOUNDS)
    assert {s: h.count for s, h in t.stages.items()} == {"waiting": 2, "loading": 2, "sending": 1}
    assert t.stages["loading"].cumulative() == [("0.1", 0), ("1.0", 0), ("10.0", 1), ("+Inf", 2)]
    assert t.jobs["done"] == 1 and t.jobs["failed"] == 1 and t.jobs["running"] == 0
    assert t.series["selected"] == 2 and t.instances == 2

    ledger.retry_job(b.id, resend=False)  # its run is kept in job_runs; the job is queued afresh
    assert counts(reader) == {"waiting": 2, "loading": 2, "sending": 1}
    again = ledger.claim_job("w:2", 60, now=utcnow() + timedelta(seconds=1))
    assert again is not None and again.id == b.id
    ledger.job_done(b.id, "w:2", {"waiting": 0.01, "loading": 1.0})
    assert counts(reader) == {"waiting": 3, "loading": 3, "sending": 1}
    reader.close()
    ledger.close()


def test_deliveries_and_rejections_are_tallied_per_destination_and_status(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    (job,) = queue_jobs(ledger, 1)
    ledger.record_deliveries(job, "pacs", [("1.1", 0xA700, False, "full"), ("1.2", 0x0000, True, "")])
    ledger.record_deliveries(job, "pacs", [("1.1", 0x0000, True, "")])
    ledger.record_rejection(calling_aet="A", sop_instance_uid="1.5", sop_class_uid=None, status=0xC231, reason="r")
    t = ledger.tallies(STAGES, BOUNDS)
    assert (t.deliveries["pacs"].attempts, t.deliveries["pacs"].stored, t.deliveries["pacs"].failures) == (3, 2, 1)
    assert t.rejected_instances == {0xC231: 1}
    ledger.close()
