"""A worker whose model cannot be loaded leaves that direction's jobs to workers that can run them.

Real ``dicomnode serve`` with one worker; the model is a copy of the shipped T1->T2 U-Net whose weights file is
damaged at start and repaired while the node runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from dicomgen import SeriesSpec, make_series
from nodeproc import NodeProcess, pynetdicom_send

SHIPPED = Path(__file__).resolve().parents[1] / "ml" / "weights"


def damaged_copy(folder: Path) -> Path:
    """The shipped T1->T2 checkpoint with its weights file cut short; returns the path of its .safetensors."""
    folder.mkdir(parents=True)
    for suffix in (".json", ".onnx"):
        shutil.copy(SHIPPED / f"unet-t1-to-t2{suffix}", folder / f"unet-t1-to-t2{suffix}")
    weights = folder / "unet-t1-to-t2.safetensors"
    weights.write_bytes((SHIPPED / "unet-t1-to-t2.safetensors").read_bytes()[:4096])
    return weights


@pytest.mark.slow
def test_jobs_wait_queued_while_the_model_cannot_load_and_run_once_it_can(tmp_path: Path) -> None:
    weights = damaged_copy(tmp_path / "model")
    with NodeProcess(tmp_path / "n", worker={"processes": 1, "model_retry_seconds": 1.0},
                     model={"t1_to_t2": str(weights), "directions": ["t1-to-t2"], "device": "cpu",
                            "engine": "torch"}) as node:
        series = make_series(SeriesSpec(slices=8, rows=64, cols=64))
        assert pynetdicom_send(node.port, series) == [0] * 8
        node.wait_for(lambda s: s["jobs"], what="a job")
        time.sleep(4.0)  # the worker has tried to load the model several times meanwhile
        job = node.status()["jobs"][0]
        assert job["state"] == "queued", job  # not claimed, so not failed
        code, body = node.http_get("/healthz")
        assert code == 503 and not json.loads(body)["checks"]["model"]["ok"]
        assert "t1-to-t2" in json.loads(body)["checks"]["model"]["detail"]
        assert "could not be loaded (its jobs are left to other workers" in node.log()
        tmp = weights.with_name("repaired.tmp")
        shutil.copy(SHIPPED / "unet-t1-to-t2.safetensors", tmp)
        tmp.replace(weights)  # the operator puts the right file in place
        st = node.wait_for(lambda s: s["jobs"][0]["state"] in ("done", "held", "failed"), timeout=120,
                           what="the job to run")
        assert st["jobs"][0]["state"] in ("done", "held"), st["jobs"][0]
        deadline = time.monotonic() + 20
        while (code := node.http_get("/healthz")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert code == 200
        assert node.stop() == 0
