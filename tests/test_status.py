"""`dicomnode status`: read-only, one line and exit 2 when the ledger cannot be read, readable at 100 columns."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from builtjob import make_node
from netutil import free_port


def test_status_reads_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [])
    node.add_built_job(slices=4)
    db = node.cfg.storage.dir / "ledger.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # e.g. serve recording an instance, or a long checkpoint
    writer.execute("UPDATE jobs SET error = 'uncommitted' WHERE id = 1")
    try:
        started = time.monotonic()
        res = node.cli("status", "--json", timeout=30)
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert res.returncode == 0, res.stderr
    assert elapsed < 20  # not waiting for the writer (its busy timeout is 60 s)
    (job,) = json.loads(res.stdout)["jobs"]
    assert job["error"] is None  # the committed state, not the writer's


def test_status_changes_nothing_in_the_ledger(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [])
    node.add_built_job(slices=4)
    node.ledger.close()
    db = node.cfg.storage.dir / "ledger.db"
    con = sqlite3.connect(db)
    con.execute("DROP TABLE job_runs")  # a ledger from before job_runs existed
    con.commit()
    con.close()
    res = node.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["jobs"][0]["previous_runs"] == []
    con = sqlite3.connect(db)
    assert "job_runs" not in {r[0] for r in con.execute("select name from sqlite_master")}  # not migrated by status
    con.close()


def test_an_unreadable_ledger_is_one_line_and_exit_2(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [])
    node.ledger.close()
    db = node.cfg.storage.dir / "ledger.db"
    for f in db.parent.glob("ledger.db*"):
        f.unlink()
    missing = node.cli("status")
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1 and "no ledger" in missing.stderr
    assert not db.exists()  # status does not create one
    db.write_bytes(b"this is not a database" * 100)
    garbage = node.cli("status", "--json")
    assert garbage.returncode == 2 and len(garbage.stderr.splitlines()) == 1, garbage.stderr
    assert "cannot read the ledger" in garbage.stderr and garbage.stdout == ""


def test_an_unknown_state_lists_the_valid_ones(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [])
    res = node.cli("status", "--state", "bogus")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    for state in ("receiving", "selected", "not_selected", "queued", "running", "delivering", "retrying", "done",
                  "failed", "superseded"):
        assert state in res.stderr
    assert node.cli("status", "--state", "retrying").returncode == 0


def test_the_table_is_readable_at_100_columns(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
                     delivery={"backoff_initial_seconds": 0.3, "backoff_max_seconds": 0.6, "timeout_seconds": 3.0})
    job_id, _ = node.add_built_job(slices=4, description="t1_mprage_sag_p2_iso")
    node.run_worker(lambda st: node.job(job_id)["attempts"] >= 1)
    data = json.loads(node.cli("status", "--json").stdout)
    series, job = data["series"][0], data["jobs"][0]
    res = node.cli("status", env={"COLUMNS": "100"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert max(len(line) for line in out.splitlines()) <= 100
    assert series["series_uid"] not in out and series["series_uid"][-12:] in out  # shortened UIDs
    assert job["output_series_uid"][-12:] in out
    assert "t1_mprage_sag_p2_iso" in out and "MR" in out
    sd = series["study_date"]
    assert sd and f"{sd[:4]}-{sd[4:6]}-{sd[6:]}" in out  # study date
    for stage in ("waiting", "inference", "sending"):  # full stage names
        assert f"{stage} " in out
    assert "retrying (next attempt at" in out and "cannot connect" in out


def test_the_qc_verdict_and_reasons_are_shown_within_100_columns_and_in_json(tmp_path: Path) -> None:
    node = make_node(tmp_path / "node", [])
    plain, _ = node.add_built_job(slices=4)
    warned, _ = node.add_built_job(slices=4)
    reason = "slice spacing 5 mm outside the training range 3-3 mm"
    node.ledger.record_qc(warned, verdict="warn", reasons=[reason, "unstable prediction (mirrored input changes it "
                                                                   "by 14 %)"],
                          checks={"slice_thickness": {"value": 5.0, "threshold": "[2, 4.5] mm", "verdict": "warn",
                                                      "reason": reason}}, model_identity="tiny-1-abc")
    node.run_worker(lambda st: all(j["state"] == "done" for j in st["jobs"]))
    jobs = {j["id"]: j for j in json.loads(node.cli("status", "--json").stdout)["jobs"]}
    assert jobs[plain]["qc"] is None
    assert jobs[warned]["qc"]["verdict"] == "warn" and jobs[warned]["qc"]["reasons"][0] == reason
    assert jobs[warned]["qc"]["checks"]["slice_thickness"]["value"] == 5.0
    out = node.cli("status", env={"COLUMNS": "100"}).stdout
    assert max(len(line) for line in out.splitlines()) <= 100
    header = next(x for x in out.splitlines() if "direction" in x)
    assert " qc " in header and any(x.startswith(f"  {warned} ") and " warn " in x for x in out.splitlines())
    assert f"job {warned}: QC warn: {reason}; unstable prediction" in out.replace("\n", " ").replace("  ", " ")
    assert f"job {plain}:" not in out
