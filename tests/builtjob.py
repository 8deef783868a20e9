"""A job whose synthetic series is built and waiting for delivery, without running a model.

The real ledger, the real :class:`dicom_node.worker.Worker` (its delivery and
retry code) and the real ``dicomnode`` CLI as a subprocess; only inference is
replaced by a phantom image, which is all delivery needs.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from dicomgen import SeriesSpec, make_series, phantom
from dicomgen import write_series as write_source
from dicom_node.build import ModelIdentity, build_synthetic_series, write_series
from dicom_node.config import Config, Direction, load_config
from dicom_node.status import status_json
from dicom_node.volume import load_series
from dicom_node.worker import Worker
from netutil import free_port
from nodeproc import DICOMNODE, node_sections, write_config
from storage.ledger import InstanceRecord, Ledger, utcnow

MODEL = ModelIdentity(name="t1t2-unet", version="2.1.0", identity="sha256:0f3a9c")
SETUP = "setup:0"


@dataclass
class Node:
    """A node's configuration and ledger (no ``serve`` process)."""

    folder: Path
    config_path: Path
    cfg: Config
    ledger: Ledger

    def add_built_job(self, slices: int = 6, description: str = "t1_mprage_sag") -> tuple[int, list[Path]]:
        """Receive a T1 series, complete it and build its synthetic series; returns (job id, output files)."""
        src = make_series(SeriesSpec(slices=slices, rows=48, cols=48, description=description))
        spool = self.cfg.spool_dir
        paths = write_source(src, spool / src[0].StudyInstanceUID / src[0].SeriesInstanceUID)
        for ds, path in zip(src, paths):
            self.ledger.record_instance(InstanceRecord(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
                path=str(path.relative_to(spool)), size_bytes=path.stat().st_size, calling_aet="STORESCU",
                modality="MR", description=description, attrs={}))
        (due,) = self.ledger.due_series(0, None, now=utcnow() + timedelta(seconds=1))
        job_id = self.ledger.complete_series(due, classification="T1", reason="test", direction="t1-to-t2")
        assert isinstance(job_id, int)
        while (claimed := self.ledger.claim_job(SETUP, 60)) is not None and claimed.id != job_id:
            pass  # an earlier built job, claimable for delivery: held by SETUP until released below
        assert claimed is not None
        vol = load_series(paths)
        dss = build_synthetic_series(vol, phantom(vol.pixels.shape, "T2"), direction=Direction.T1_TO_T2,
                                     model=MODEL, output=self.cfg.output, node_ae_title=self.cfg.node.ae_title)
        out = self.cfg.storage.dir / "output" / f"job-{job_id}"
        files = write_series(dss, out)
        self.ledger.job_built(job_id, SETUP, output_dir=str(out), output_series_uid=str(dss[0].SeriesInstanceUID),
                              output_instances=len(files), model_identity=MODEL.identity, timings={"inference": 1.0})
        self.ledger.release_own(SETUP)  # claimable for delivery now
        return job_id, files

    def worker(self) -> Worker:
        return Worker(self.cfg, self.ledger)

    def run_worker(self, until: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                   worker: Worker | None = None) -> dict[str, Any]:
        """Let a real Worker take due jobs until ``until(status)`` holds."""
        w = worker or self.worker()
        deadline = time.monotonic() + timeout
        while True:
            st = status_json(self.ledger.status(limit=500))  # as `status --json` shows it
            if until(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; status: {json.dumps(st, indent=1)[:3000]}")
            job = self.ledger.claim_job(w.name, 30)
            if job is None:
                time.sleep(0.1)
            else:
                w.process(job)

    def job(self, job_id: int) -> dict[str, Any]:
        return next(j for j in status_json(self.ledger.status(limit=500))["jobs"] if j["id"] == job_id)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run([*DICOMNODE, *args, "--config", str(self.config_path)], capture_output=True, text=True,
                              cwd=self.folder, timeout=timeout, env={**os.environ, **(env or {})})


def make_node(folder: Path, destinations: list[dict[str, Any]], **over: dict[str, Any]) -> Node:
    folder.mkdir(parents=True, exist_ok=True)
    sections = node_sections(folder, free_port(), **over)
    path = write_config(folder, sections, destinations)
    cfg = load_config(path)
    return Node(folder, path, cfg, Ledger(cfg.storage.ledger_url))
