#!/usr/bin/env python3
"""End-to-end latency: last source C-STORE response -> last synthetic instance stored at the destination.

``dicomnode serve`` (one warm worker, the shipped default model) receives a T1
series from dcmtk ``storescu`` and delivers the synthetic T2 series to dcmtk
``storescp`` (both with ``TCP_NODELAY=1``).  The series completes on the
association's release (``release_grace_seconds = 0``), so the quiet period is
not part of the latency; the completion check runs every 0.25 s, and that wait
is included.  The per-stage breakdown comes from the job's timings in the
ledger.

Usage: python benchmarks/e2e.py [--device cpu|cuda] [--repeats 3] [--t1-to-t2 CHECKPOINT]

``--t1-to-t2`` runs another T1->T2 checkpoint instead of the shipped one (``model.t1_to_t2``), e.g. an earlier
version taken from git, so that two models are compared in one session on one machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from dicomgen import SeriesSpec, make_series, write_series  # noqa: E402
from ingest import machine  # noqa: E402
from netutil import DcmtkStoreSCP, dcmtk, dcmtk_env  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402

from vocab.states import JobState  # noqa: E402

CASES = {"48x320x320": (48, 320, 3.0), "176x256x256": (176, 256, 1.0)}


def run_case(node: NodeProcess, scp_dir: Path, work: Path, name: str, seed: int) -> dict[str, float]:
    slices, size, spacing = CASES[name]
    src = make_series(SeriesSpec(weighting="T1", slices=slices, rows=size, cols=size, slice_spacing=spacing, seed=seed))
    files = write_series(src, work / f"{name}-{seed}")
    before = len(list(scp_dir.iterdir()))
    res = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                          *map(str, files)], env=dcmtk_env(), capture_output=True, text=True)
    t_sent = time.perf_counter()
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    next_check = t_sent + 60.0  # after any normal latency: `dicomnode status` costs CPU and would skew the figure
    while len(list(scp_dir.iterdir())) < before + slices:
        time.sleep(0.005)
        now = time.perf_counter()
        if now > next_check:  # a held job never arrives: say so instead of waiting out the timeout
            next_check = now + 10.0
            job = next((j for j in node.status()["jobs"] if j["source_series_uid"] == src[0].SeriesInstanceUID), None)
            if job is not None and job["state"] == JobState.HELD.value:
                raise RuntimeError(f"job {job['id']} held by QC; log:\n{node.log()[-2000:]}")
        if now - t_sent > 600:
            raise TimeoutError(f"synthetic series not delivered; log:\n{node.log()[-3000:]}")
    latency = time.perf_counter() - t_sent
    time.sleep(0.3)  # let the worker record its final timings
    job = next(j for j in node.status()["jobs"] if j["source_series_uid"] == src[0].SeriesInstanceUID)
    return {"latency": latency, **job["timings"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-e2e-bench")
    ap.add_argument("--t1-to-t2", type=Path, default=None, help="T1->T2 checkpoint (.safetensors) instead of the shipped one")
    args = ap.parse_args()
    model: dict[str, object] = {"device": args.device, "directions": ["t1-to-t2"]}
    if args.t1_to_t2 is not None:
        model["t1_to_t2"] = str(args.t1_to_t2.resolve())
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    with DcmtkStoreSCP(args.work / "storescp", ae_title="PACS") as scp:
        node = NodeProcess(
            args.work / "node",
            destinations=[{"name": "storescp", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}],
            series={"quiet_seconds": 30.0, "complete_on_release": True, "release_grace_seconds": 0.0},
            worker={"processes": 1},
            model=model,
            # the generated series is a phantom, not a brain: QC may fail it, and the latency still includes its QC
            qc={"on_fail": "send"},
        ).start()
        try:
            print(f"# {machine()}; device {args.device}; t1-to-t2 {args.t1_to_t2 or 'shipped'}")
            run_case(node, scp.folder, args.work, "48x320x320", seed=99)  # warm-up (model already loaded)
            results: dict[str, list[dict[str, float]]] = {}
            for name in CASES:
                for r in range(args.repeats):
                    t = run_case(node, scp.folder, args.work, name, seed=r)
                    results.setdefault(name, []).append(t)
                    print(name, json.dumps({k: round(v, 3) for k, v in t.items()}), flush=True)
        finally:
            node.stop()
    stages = ("latency", "waiting", "loading", "inference", "qc", "building", "sending")
    print("\n| series | " + " | ".join(f"{s} (s)" for s in stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name, rows in results.items():
        med = {s: statistics.median(r.get(s, 0.0) for r in rows) for s in stages}
        print(f"| {name} | " + " | ".join(f"{med[s]:.2f}" for s in stages) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
