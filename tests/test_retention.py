"""Retention: only settled series lose files, oldest first; a dry run changes nothing; a kill mid-prune is finished.

Real spool files and a real ledger; ``dicomnode prune`` runs as a real process.
Ages are set in the ledger's timestamps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from datetime import timedelta

from dicomgen import SeriesSpec, make_series
from nodeproc import DICOMNODE, NodeProcess, ledger_rows, pynetdicom_send, spooled
from settled import Store
from tmpfs import mounted_tmpfs
from storage.ledger import utcnow


def tree(root: Path) -> dict[str, str]:
    """Every file under *root* with a digest of its content (the ledger's database file among them)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("ledger.db-shm", ".lock"):
            out[str(p.relative_to(root))] = hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
    return out


def used_percent(path: Path) -> float:
    u = shutil.disk_usage(path)
    return 100 * u.used / (u.used + u.free)


def test_only_series_whose_every_job_is_done_or_superseded_lose_files_past_their_age(tmp_path: Path) -> None:
    st = Store(tmp_path, spool_days=7, output_days=7, ledger_days=90, high_water_percent=0)
    done_old = st.series(["done"], age_days=10)
    superseded_old = st.series(["superseded", "done"], age_days=10)
    not_selected_old = st.series([], selected=False, age_days=10)
    done_recent = st.series(["done"], age_days=3)
    kept = {
        "failed": st.series(["failed"], age_days=30),
        "done + failed": st.series(["done", "failed"], age_days=30),
        "queued": st.series(["queued"], age_days=30),
        "running": st.series(["running"], age_days=30),
        "delivering (retrying)": st.series(["delivering"], age_days=30),
        "held (a state retention does not know)": st.series(["held"], age_days=30),
        "done + held": st.series(["done", "held"], age_days=30),
        "receiving": st.series([], receiving=True, age_days=30),
    }
    out = st.prune().stdout
    assert "spool: removed 3 series (12 instances" in out and "output: removed 2 series (12 files" in out, out
    for m in (done_old, superseded_old, not_selected_old):
        assert st.spool_pruned(m) and st.outputs_pruned(m)
        assert st.series_row(m), "ledger rows are kept longer than files"
    assert st.intact(done_recent)
    for why, m in kept.items():
        assert st.intact(m), why
    assert st.rows("SELECT instances FROM series WHERE id=?", done_old.series_id) == [(0,)]
    again = st.prune().stdout
    assert "spool: removed 0 series" in again and "output: removed 0 series" in again


def test_spool_and_outputs_have_their_own_ages_and_ledger_rows_go_last(tmp_path: Path) -> None:
    st = Store(tmp_path, spool_days=5, output_days=20, ledger_days=60, high_water_percent=0)
    m10, m30, m100 = st.series(["done"], age_days=10), st.series(["done"], age_days=30), st.series(["done"], age_days=100)
    out = st.prune().stdout
    assert "spool: removed 3 series" in out and "output: removed 2 series" in out
    assert "ledger: removed the rows of 1 series" in out
    assert st.spool_pruned(m10) and not st.outputs_pruned(m10) and st.series_row(m10)
    assert st.spool_pruned(m30) and st.outputs_pruned(m30) and st.series_row(m30)
    assert not st.series_row(m100) and not any(d.exists() for d in m100.output_dirs)
    assert st.rows("SELECT count(*) FROM jobs WHERE series_id=?", m100.series_id) == [(0,)]
    assert st.rows("SELECT count(*) FROM prunes WHERE series_id=?", m100.series_id) == [(0,)]


def test_dry_run_changes_nothing_and_reports_what_prune_then_removes(tmp_path: Path) -> None:
    st = Store(tmp_path, spool_days=7, output_days=7, ledger_days=60, high_water_percent=0)
    for age in (3, 10, 12, 100):
        st.series(["done"], age_days=age)
    st.series(["failed"], age_days=100)
    st.close()
    before = tree(tmp_path / "var")
    dry = st.prune("--dry-run").stdout
    assert tree(tmp_path / "var") == before, "a dry run changed files or the ledger"
    real = st.prune().stdout
    assert "would remove" in dry and "removed 3 series" in real
    strip = lambda text: [l.replace("would remove", "removed") for l in text.splitlines() if not l.startswith("disk:")]
    assert strip(dry) == strip(real)


def test_the_disk_high_water_mark_prunes_the_oldest_settled_series_first_until_below(tmp_path: Path) -> None:
    # the high-water mark needs a disk of known size
    with mounted_tmpfs(tmp_path / "fs", 3) as fs:
        # the ledger elsewhere: only files count on this disk
        st = Store(fs / "node", storage={"ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}, spool_days=365,
                   output_days=365, ledger_days=365, high_water_percent=50)
        # 8 series of 4 x 32 KB instances (+ outputs, as much): 2 MB of the 3 MB disk
        made = [st.series(["done"], age_days=40 - i, slices=4, size=128) for i in range(7)]
        unfinished = st.series(["failed"], age_days=100, slices=4, size=128)
        used = lambda: used_percent(fs)
        assert used() > 60, used()
        st.close()
        before = tree(tmp_path)
        dry = st.prune("--dry-run").stdout
        assert tree(tmp_path) == before, "a dry run changed files or the ledger"
        out = st.prune().stdout
        assert used() <= 50, (used(), out)
        pruned = [st.spool_pruned(m) and st.outputs_pruned(m) for m in made]
        k = sum(pruned)
        assert 0 < k < len(made) and pruned == [True] * k + [False] * (len(made) - k), pruned  # oldest first
        assert all(st.intact(m) for m in made[k:]) and st.intact(unfinished)
        assert f"spool: removed {k} series" in out and "[disk " in out, out
        assert f"spool: would remove {k} series" in dry, dry


def test_a_prune_killed_mid_way_leaves_no_dangling_rows_and_the_next_prune_finishes_it(tmp_path: Path) -> None:
    st = Store(tmp_path, spool_days=1, output_days=1, ledger_days=90, high_water_percent=0)
    made = [st.series(["done"], age_days=5, slices=4, quick=True) for _ in range(100)]
    st.close()
    proc = subprocess.Popen([*DICOMNODE, "prune", "--config", str(st.config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        n = st.rows("SELECT count(*) FROM prunes")[0][0] if (tmp_path / "var" / "ledger.db").exists() else 0
        if n >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "prune finished before it could be killed mid-way; give it more series"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # whatever the moment: no instance row points at a file that is gone, unless its removal is recorded as begun
    begun = {sid for (sid,) in st.rows("SELECT series_id FROM prunes WHERE finished_at IS NULL")}
    for m in made:
        rows = st.rows("SELECT path FROM instances WHERE series_id=?", m.series_id)
        missing = [p for (p,) in rows if not (st.cfg.spool_dir / p).exists()]
        assert not missing or m.series_id in begun
    states = [(st.spool_pruned(m), st.intact(m)) for m in made]
    assert any(p for p, _ in states) and any(i for _, i in states), "the kill was not mid-way"
    # serve's start finishes what was begun (and, with interval_minutes = 0, prunes nothing else)
    with NodeProcess(tmp_path, retention={"spool_days": 1, "output_days": 1, "interval_minutes": 0}):
        pass
    assert st.rows("SELECT count(*) FROM prunes WHERE finished_at IS NULL") == [(0,)]
    for m in made:
        assert st.intact(m) or (st.spool_pruned(m) and st.outputs_pruned(m)) or (
            st.spool_pruned(m) and not st.rows("SELECT 1 FROM prunes WHERE series_id=? AND what='output'",
                                               m.series_id)), "a half-deleted series"
    st.prune()
    for m in made:
        assert st.spool_pruned(m) and st.outputs_pruned(m), m
    assert st.rows("SELECT count(*) FROM prunes WHERE finished_at IS NULL") == [(0,)]
    assert not [p for p in (st.cfg.spool_dir).iterdir() if not p.name.startswith(".")], "half-deleted folders left"


def _settle_jobs(node: NodeProcess, days_ago: float) -> None:
    """Every job of the node done (delivered), and everything of it *days_ago* old."""
    import sqlite3

    then = (utcnow() - timedelta(days=days_ago)).isoformat(sep=" ")
    con = sqlite3.connect(node.storage / "ledger.db", timeout=30)
    try:
        con.execute("UPDATE jobs SET state='done' WHERE state='queued'")
        con.execute("UPDATE jobs SET finished_at=?, created_at=?", (then, then))
        con.execute("UPDATE series SET completed_at=?, last_received_at=? WHERE state!='receiving'", (then, then))
        con.commit()
    finally:
        con.close()


def _series_row(node: NodeProcess, uid: str) -> tuple[int, str, int, int]:
    rows = ledger_rows(node, f"SELECT generation, state, instances, (SELECT count(*) FROM instances i WHERE "
                             f"i.series_id=s.id) FROM series s WHERE series_uid='{uid}'")
    assert len(rows) == 1, rows
    return rows[0]


def test_a_series_resent_after_pruning_is_received_and_processed_as_new(tmp_path: Path) -> None:
    datasets = make_series(SeriesSpec(slices=5, rows=16, cols=16))
    uid = str(datasets[0].SeriesInstanceUID)
    with NodeProcess(tmp_path, retention={"spool_days": 1, "output_days": 1, "ledger_days": 2,
                                          "interval_minutes": 0}) as node:
        selected = lambda gen: lambda st: any(s["series_uid"] == uid and s["state"] == "selected"
                                              and s["generation"] == gen for s in st["series"])
        assert pynetdicom_send(node.port, datasets) == [0] * 5
        node.wait_for(selected(1), what="series selected")
        _settle_jobs(node, days_ago=1.5)  # files past their age, ledger rows not yet
        assert "spool: removed 1 series (5 instances" in node.cli("prune").stdout
        assert not spooled(node, datasets[0]).parent.exists() and _series_row(node, uid) == (1, "selected", 0, 0)

        # the same series again, to the same running node: stored, counted and processed as new
        assert pynetdicom_send(node.port, datasets) == [0] * 5
        node.wait_for(selected(2), what="series selected again")
        assert _series_row(node, uid) == (2, "selected", 5, 5) and all(spooled(node, ds).exists() for ds in datasets)
        assert [j["state"] for j in node.status()["jobs"]] == ["queued", "done"]

        _settle_jobs(node, days_ago=10)  # now past the ledger's age too: files and rows go
        out = node.cli("prune").stdout
        assert "spool: removed 1 series" in out and "ledger: removed the rows of 1 series" in out, out
        assert ledger_rows(node, "SELECT count(*) FROM series") == [(0,)]
        assert ledger_rows(node, "SELECT count(*) FROM jobs") == [(0,)]

        assert pynetdicom_send(node.port, datasets) == [0] * 5
        node.wait_for(selected(1), what="series selected as a new one")
        assert _series_row(node, uid) == (1, "selected", 5, 5)
        assert [j["state"] for j in node.status()["jobs"]] == ["queued"]


def test_serve_prunes_periodically_and_logs_what_it_removed(tmp_path: Path) -> None:
    datasets = make_series(SeriesSpec(slices=4, rows=16, cols=16))
    keep = make_series(SeriesSpec(slices=4, rows=16, cols=16))
    with NodeProcess(tmp_path, retention={"spool_days": 1, "output_days": 1, "interval_minutes": 0.02}) as node:
        assert pynetdicom_send(node.port, datasets) == [0] * 4
        node.wait_for(lambda st: any(s["state"] == "selected" for s in st["series"]), what="series selected")
        _settle_jobs(node, days_ago=3)
        assert pynetdicom_send(node.port, keep) == [0] * 4  # receiving while the first goes: kept
        deadline = time.monotonic() + 30
        while spooled(node, datasets[0]).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not spooled(node, datasets[0]).exists(), node.log()[-3000:]
        assert all(spooled(node, ds).exists() for ds in keep)
        assert "retention: spool: removed 1 series (4 instances" in node.log()
        assert "1.2.826" not in "".join(l for l in node.log().splitlines() if "retention:" in l), "UIDs logged"


def test_a_removal_begun_and_cut_short_is_finished_by_the_next_prune(tmp_path: Path) -> None:
    st = Store(tmp_path, spool_days=1, output_days=30, ledger_days=90, high_water_percent=0)
    m = st.series(["done"], age_days=5, slices=6)
    # what a crash between deleting the files and closing the record leaves: a begun record, half the files gone
    ticket = st.ledger.begin_prune(m.series_id, 1, "spool", "age")
    assert ticket is not None and len(ticket.paths) == 6
    for f in m.spool_files[:3]:
        f.unlink()
    st.close()
    assert "interrupted: finished 1 removal(s)" in st.prune().stdout
    assert st.spool_pruned(m) and st.rows("SELECT files FROM prunes WHERE series_id=?", m.series_id) == [(6,)]


def test_a_series_received_again_during_a_cut_short_removal_keeps_what_is_still_there(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    from dicom_node import selection
    from storage.ledger import InstanceRecord

    st = Store(tmp_path, spool_days=1, output_days=30, ledger_days=90, high_water_percent=0)
    m = st.series(["done"], age_days=5, slices=6)
    assert st.ledger.begin_prune(m.series_id, 1, "spool", "age") is not None
    m.spool_files[0].unlink()  # cut short after one file
    # then a new instance of the series arrives (as serve stores it): the series reopens as generation 2
    import pydicom

    ds = pydicom.dcmread(m.spool_files[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    f = st.spool.write_bytes(_encoded(ds), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    out = st.ledger.record_instance(InstanceRecord.of(
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=f.relpath,
        size_bytes=f.size, calling_aet="PYNETDICOM", facts=selection.facts(ds)))
    assert out.reopened and out.generation == 2
    st.close()
    st.prune()
    left = {p for (p,) in st.rows("SELECT path FROM instances WHERE series_id=?", m.series_id)}
    assert len(left) == 6 and all((st.cfg.spool_dir / p).exists() for p in left), "5 old and the new one stay"
    assert st.rows("SELECT state, generation, instances FROM series WHERE id=?", m.series_id) == [("receiving", 2, 6)]
    assert st.rows("SELECT count(*) FROM prunes WHERE finished_at IS NULL") == [(0,)]


def _encoded(ds: object) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def test_an_instance_arriving_while_a_prune_holds_the_spool_waits_and_is_then_stored(tmp_path: Path) -> None:
    import threading

    from storage.spool import Spool

    datasets = make_series(SeriesSpec(slices=2, rows=16, cols=16))
    with NodeProcess(tmp_path, retention={"interval_minutes": 0}) as node:
        spool = Spool(node.storage / "spool")
        result: list[list[int | None]] = []
        with spool.exclusive():
            t = threading.Thread(target=lambda: result.append(pynetdicom_send(node.port, datasets)))
            t.start()
            time.sleep(2.0)
            assert not result and not spooled(node, datasets[0]).exists(), "stored while retention held the spool"
        t.join(30)
        assert result == [[0, 0]] and all(spooled(node, ds).exists() for ds in datasets)


def test_removing_a_series_whose_folder_an_interrupted_removal_already_took_still_removes_its_empty_study(
        tmp_path: Path) -> None:
    from storage.spool import Spool

    spool = Spool(tmp_path / "spool")
    rel = [f"1.2.3/1.2.3.4/1.2.3.4.{i}.dcm" for i in range(3)]
    for r in rel:
        (spool.root / r).parent.mkdir(parents=True, exist_ok=True)
        (spool.root / r).write_bytes(b"x")
    for r in rel:  # a removal killed between the series folder and its study folder
        (spool.root / r).unlink()
    (spool.root / "1.2.3" / "1.2.3.4").rmdir()
    assert spool.remove_series_files(rel) == rel  # finishing it: every file was already gone
    assert not (spool.root / "1.2.3").exists(), "the empty study folder was left behind"
