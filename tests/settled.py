"""A storage folder with real spooled series and a real ledger, in any state and of any age (for retention tests).

Series are stored the way ``serve`` stores them (spool commit, ledger record,
completion); job states, outputs and timestamps are then set in the ledger, so
that "ten days ago" needs no sleeping.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicomgen import SeriesSpec, make_series
from nodeproc import DICOMNODE, node_sections, write_config

from dicom_node import selection
from dicom_node.config import Config, load_config
from storage.ledger import InstanceRecord, Ledger, utcnow
from storage.models import Job
from storage.spool import Spool, SpooledFile
from vocab import Direction


@dataclass(frozen=True)
class Made:
    series_id: int
    series_uid: str
    spool_files: list[Path]
    output_dirs: list[Path]
    job_ids: list[int]


class Store:
    def __init__(self, folder: Path, storage: dict[str, Any] | None = None, **retention: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.config = write_config(folder, node_sections(folder, 0, retention=retention, storage=storage or {}))
        self.cfg: Config = load_config(self.config)
        self.spool = Spool(self.cfg.spool_dir)
        self.ledger = Ledger(self.cfg.storage.ledger_url)
        self._template: tuple[bytes, dict[str, Any]] | None = None
        self.db = Path(self.cfg.storage.ledger_url.removeprefix("sqlite:///"))

    def close(self) -> None:
        self.ledger.close()

    def series(self, job_states: Sequence[str] = ("done",), *, age_days: float = 10.0, selected: bool = True,
               receiving: bool = False, slices: int = 4, size: int = 16, quick: bool = False) -> Made:
        """A series received *age_days* ago whose jobs (the first made by completion) ended in *job_states*."""
        if quick:  # the first series' first instance under new names, not made durable: only for many series
            if self._template is None:
                ds = make_series(SeriesSpec(slices=1, rows=size, cols=size))[0]
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                self._template = (buf.getvalue(), selection.facts(ds))
            data, facts = self._template
            study, uid = str(generate_uid()), str(generate_uid())
            uids: list[tuple[str, bytes, dict[str, Any]]] = [(str(generate_uid()), data, facts)
                                                              for _ in range(slices)]
        else:
            datasets = make_series(SeriesSpec(slices=slices, rows=size, cols=size))
            study, uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
            uids = []
            for ds in datasets:
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                uids.append((str(ds.SOPInstanceUID), buf.getvalue(), selection.facts(ds)))
        files = []
        for sop, data, facts in uids:
            if quick:
                rel = self.spool.relpath_for(study, uid, sop)
                self.spool.path(rel).parent.mkdir(parents=True, exist_ok=True)
                self.spool.path(rel).write_bytes(data)
                f = SpooledFile(self.spool.path(rel), rel, len(data))
            else:
                f = self.spool.write_bytes(data, study, uid, sop)
            out = self.ledger.record_instance(InstanceRecord.of(
                sop_instance_uid=sop, sop_class_uid=MRImageStorage, study_uid=study, series_uid=uid,
                transfer_syntax=ExplicitVRLittleEndian, path=f.relpath, size_bytes=f.size, calling_aet="PYNETDICOM",
                facts=facts))
            files.append(f.path)
        sid = out.series_id
        then = utcnow() - timedelta(days=age_days)
        job_ids: list[int] = []
        outputs: list[Path] = []
        if not receiving:
            due = next(d for d in self.ledger.due_series(0, None) if d.id == sid)
            first = self.ledger.complete_series(due, classification="T1", reason="test",
                                                direction=Direction.T1_TO_T2 if selected else None)
            if selected:
                assert isinstance(first, int)
                job_ids.append(first)
                with self.ledger.session() as s, s.begin():
                    for _ in job_states[1:]:
                        j = Job(series_id=sid, source_series_uid=uid, generation=1, direction="t1-to-t2",
                                state="queued", next_attempt_at=then, created_at=then, timings={})
                        s.add(j)
                        s.flush()
                        job_ids.append(j.id)
        for jid in job_ids:  # every synthesis is quality-controlled, so every job has a QC row
            self.ledger.record_qc(jid, verdict="pass", reasons=[], checks={}, model_identity="test")
        con = sqlite3.connect(self.db)
        try:
            for jid, state in zip(job_ids, job_states):
                d = self.cfg.output_dir / f"job-{jid}"
                d.mkdir(parents=True, exist_ok=True)
                for src in files:
                    (d / src.name).write_bytes(src.read_bytes())
                outputs.append(d)
                con.execute("UPDATE jobs SET state=?, finished_at=?, created_at=?, output_dir=?, output_instances=? "
                            "WHERE id=?", (state, then, then, str(d), len(files), jid))
            con.execute("UPDATE series SET first_received_at=?, last_received_at=?, completed_at=? WHERE id=?",
                        (then, then, None if receiving else then, sid))
            con.commit()
        finally:
            con.close()
        return Made(sid, uid, files, outputs, job_ids)

    # ------------------------------------------------------------------ looking
    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.db)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def instance_rows(self, m: Made) -> int:
        return int(self.rows("SELECT count(*) FROM instances WHERE series_id=?", m.series_id)[0][0])

    def intact(self, m: Made) -> bool:
        """Everything of the series is still there: files, rows, outputs."""
        return (all(f.exists() for f in m.spool_files) and self.instance_rows(m) == len(m.spool_files)
                and all(d.is_dir() and len(list(d.iterdir())) == len(m.spool_files) for d in m.output_dirs))

    def spool_pruned(self, m: Made) -> bool:
        """Its files and instance rows are gone, its folder too, and the ledger says so."""
        said = self.rows("SELECT count(*) FROM prunes WHERE series_id=? AND what='spool' AND finished_at IS NOT NULL",
                         m.series_id)[0][0]
        return (not any(f.exists() for f in m.spool_files) and not m.spool_files[0].parent.exists()
                and self.instance_rows(m) == 0 and said == 1)

    def outputs_pruned(self, m: Made) -> bool:
        return not any(d.exists() for d in m.output_dirs)

    def series_row(self, m: Made) -> bool:
        return bool(self.rows("SELECT count(*) FROM series WHERE id=?", m.series_id)[0][0])

    def prune(self, *args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*DICOMNODE, "prune", "--config", str(self.config), *args], capture_output=True,
                             text=True, timeout=120, cwd=self.folder)
        assert res.returncode == 0, res.stderr
        return res
