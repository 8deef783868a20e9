"""Delivery retries: a destination that is down is retried for hours; `dicomnode retry` re-sends the built output.

Real peers on loopback (dcmtk storescp, a pynetdicom SCP answering chosen statuses), the real
Worker delivery code and the real CLI; only inference is skipped (see builtjob.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from builtjob import Node, make_node
from dicom_node.config import DeliveryConfig
from dicom_node.retry import RetryPolicy
from netutil import DcmtkStoreSCP, PynetdicomStoreSCP, free_port, needs_dcmtk

FAST = {"backoff_initial_seconds": 0.3, "backoff_max_seconds": 0.6, "timeout_seconds": 3.0}


def dest(port: int, ae: str = "STORESCP") -> list[dict[str, Any]]:
    return [{"name": "pacs", "ae_title": ae, "host": "127.0.0.1", "port": port}]


def uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_default_schedule_retries_for_a_day_at_most_ten_minutes_apart() -> None:
    policy = RetryPolicy.from_config(DeliveryConfig())
    delays = [policy.delay(n) for n in range(1, 10)]
    assert delays[:7] == [10, 20, 40, 80, 160, 320, 600] and max(delays) == 600
    attempts = next(n for n in range(1, 10_000) if policy.gives_up(n))
    assert policy.waited(attempts) >= 24 * 3600  # a day of retrying before a job fails
    assert not policy.gives_up(attempts - 1)
    assert policy.waited(7) < 11 * 60  # a ten-minute outage costs a few attempts, not the job


@needs_dcmtk
def test_a_destination_that_is_down_is_retried_and_delivered_when_it_comes_back(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet
    node = make_node(tmp_path / "node", dest(port), delivery=FAST)
    job_id, files = node.add_built_job(slices=6)
    node.run_worker(lambda st: node.job(job_id)["attempts"] >= 2)
    job = node.job(job_id)
    assert job["state"] == "delivering" and job["retrying"] and job["next_attempt_at"]
    assert "cannot connect" in job["error"]
    text = node.cli("status", env={"COLUMNS": "100"})
    assert text.returncode == 0, text.stderr
    assert "retrying (next attempt at" in text.stdout
    with DcmtkStoreSCP(tmp_path / "pacs", port=port):
        node.run_worker(lambda st: node.job(job_id)["state"] == "done")
    assert uids(sorted((tmp_path / "pacs").iterdir())) == uids(files)
    assert node.job(job_id)["deliveries"] == {"pacs": "6/6 stored"}


def test_the_job_fails_when_the_retry_window_is_over(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", dest(free_port()), delivery={**FAST, "max_retry_hours": 0.0005})  # 1.8 s
    job_id, _ = node.add_built_job(slices=4)
    node.run_worker(lambda st: node.job(job_id)["state"] == "failed")
    job = node.job(job_id)
    assert "gave up after" in job["error"] and "cannot connect" in job["error"]
    assert job["attempts"] >= 3


def test_retry_resends_the_built_output_only_to_where_it_is_missing(tmp_path: Path) -> None:
    answers = {"ok": 3}
    with PynetdicomStoreSCP(lambda i, ds: 0x0000 if i < answers["ok"] else 0xC000, ae_title="PACS") as pacs:
        node = make_node(tmp_path / "node", dest(pacs.port, "PACS"), delivery=FAST)
        job_id, files = node.add_built_job(slices=6)
        mtimes = [f.stat().st_mtime_ns for f in files]
        worker = node.worker()
        node.run_worker(lambda st: node.job(job_id)["state"] == "failed", worker=worker)
        failed = node.job(job_id)
        assert failed["deliveries"] == {"pacs": "3/6 stored"} and "0xC000" in failed["error"]
        first_three = set(pacs.received[:3])
        answers["ok"] = 100  # the PACS administrator fixed it

        res = node.cli("retry", str(job_id))
        assert res.returncode == 0, res.stderr
        assert "re-sending the built output" in res.stdout and "3 already stored at pacs" in res.stdout
        node.run_worker(lambda st: node.job(job_id)["state"] == "done", worker=worker)
    resent = pacs.received[6:]
    assert len(resent) == 3 and set(resent) == uids(files) - first_three  # the stored three were not sent again
    done = node.job(job_id)
    assert done["deliveries"] == {"pacs": "6/6 stored"}
    assert "inference" not in done["timings"] and worker._models == {}  # no inference in the new run
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # the same files, not rebuilt
    assert done["attempts"] == 0 and done["error"] is None  # attempts and timings of this run only
    (earlier,) = done["previous_runs"]
    assert earlier["state"] == "failed" and "0xC000" in earlier["error"] and "sending" in earlier["timings"]


@needs_dcmtk
def test_retry_of_a_done_job_needs_force_and_then_sends_everything(tmp_path: Path) -> None:
    with DcmtkStoreSCP(tmp_path / "pacs") as scp:
        node = make_node(tmp_path / "node", dest(scp.port), delivery=FAST)
        job_id, files = node.add_built_job(slices=4)
        node.run_worker(lambda st: node.job(job_id)["state"] == "done")
        refused = node.cli("retry", str(job_id))
        assert refused.returncode == 2 and "--force" in refused.stderr and len(refused.stderr.splitlines()) == 1
        for f in (tmp_path / "pacs").iterdir():
            f.unlink()  # the PACS lost it
        forced = node.cli("retry", "--force", str(job_id))
        assert forced.returncode == 0, forced.stderr
        node.run_worker(lambda st: node.job(job_id)["state"] == "done")
    assert uids(sorted((tmp_path / "pacs").iterdir())) == uids(files)


def test_damaged_output_is_synthesized_again(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", dest(free_port()), delivery={**FAST, "max_attempts": 1})
    job_id, files = node.add_built_job(slices=4)
    node.run_worker(lambda st: node.job(job_id)["state"] == "failed")
    files[1].unlink()
    res = node.cli("retry", str(job_id))
    assert res.returncode == 0, res.stderr
    assert "synthesized again" in res.stdout and "3 of 4 built file(s)" in res.stdout
    assert node.job(job_id)["state"] == "queued"


def test_retry_all_failed(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", dest(free_port()), delivery={**FAST, "max_attempts": 1})
    a, _ = node.add_built_job(slices=4)
    b, _ = node.add_built_job(slices=4)
    node.run_worker(lambda st: all(node.job(j)["state"] == "failed" for j in (a, b)))
    res = node.cli("retry", "--all-failed")
    assert res.returncode == 0, res.stderr
    assert f"job {a} " in res.stdout and f"job {b} " in res.stdout
    assert {node.job(a)["state"], node.job(b)["state"]} == {"delivering"}
    nothing = node.cli("retry", "--all-failed")
    assert nothing.returncode == 0 and "no failed jobs" in nothing.stdout
    assert node.cli("retry").returncode == 2  # neither a job nor --all-failed
    assert node.cli("retry", "12345").returncode == 2


@pytest.mark.parametrize("bad", [{"backoff_factor": 0.5}, {"backoff_max_seconds": 1, "backoff_initial_seconds": 5},
                                 {"max_retry_hours": 0}])
def test_bad_retry_settings_are_config_errors(tmp_path: Path, bad: dict[str, float]) -> None:
    from dicom_node.config import ConfigError

    with pytest.raises(ConfigError, match="delivery"):
        make_node(tmp_path / "node", [], delivery=bad)


def test_an_automatic_retry_after_an_abort_midway_sends_only_what_was_not_stored(tmp_path: Path) -> None:
    # the 4th C-STORE gets no answer within the timeout: pynetdicom aborts, 3 stored, 3 not
    with PynetdicomStoreSCP(0x0000, ae_title="PACS", delay=2.5, delay_at=3) as pacs:
        node = make_node(tmp_path / "node", dest(pacs.port, "PACS"), delivery={**FAST, "timeout_seconds": 1.0})
        job_id, files = node.add_built_job(slices=6)
        node.run_worker(lambda st: node.job(job_id)["state"] == "done")
    first, resent = pacs.received[:4], pacs.received[4:]
    assert len(resent) == 3 and set(resent) == uids(files) - set(first[:3])  # the three stored are not resent
    assert node.job(job_id)["attempts"] == 1 and node.job(job_id)["deliveries"] == {"pacs": "6/6 stored"}
