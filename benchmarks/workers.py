#!/usr/bin/env python3
"""Several ``dicomnode worker`` processes on one PostgreSQL ledger: jobs per hour, and the claim latency.

For each worker count: a fresh database on a real PostgreSQL server (Debian's
binaries, started in a temporary folder, fsync on), one ``dicomnode serve``
without workers, and dcmtk ``storescp`` as the destination.

* Throughput: a burst of small T1 series is received and queued first, then
  ``serve`` stops and N ``dicomnode worker`` processes start (each with its own
  config file, as on other machines).  Jobs per hour = jobs / (last job
  finished - first job claimed), from the ledger's own timestamps, so model
  loading is not counted.
* Claim latency: with the N workers idle and polling (``worker.poll_seconds``),
  ``serve`` runs again and single series arrive one at a time; the latency is
  the time from a job queued to a worker claiming it (the ledger's
  ``created_at`` -> ``started_at``).

Usage: python benchmarks/workers.py [--workers 1,2,4] [--series 8] [--probes 5] [--slices 12] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from sqlalchemy import select  # noqa: E402

from dicomgen import SeriesSpec, make_series, write_series  # noqa: E402
from ingest import machine  # noqa: E402
from netutil import DcmtkStoreSCP, dcmtk, storescu  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402
from pgserver import PostgresServer  # noqa: E402
from storage.ledger import Ledger  # noqa: E402
from storage.models import Job  # noqa: E402
from workerproc import WorkerProcess  # noqa: E402


def sections(storage: Path, url: str, poll: float) -> dict[str, dict[str, Any]]:
    return {
        "security": {"allowed_calling_aets": ["STORESCU", "ECHOSCU"]},
        "storage": {"dir": str(storage), "ledger_url": url},
        "series": {"quiet_seconds": 1.0, "min_slices": 4},
        "worker": {"processes": 0, "lease_seconds": 60, "poll_seconds": poll},
        "model": {"device": "cpu"},
        "delivery": {"timeout_seconds": 30.0},
    }


def jobs(url: str) -> list[Job]:
    led = Ledger(url, read_only=True)
    try:
        with led.session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))
    finally:
        led.close()


def wait_jobs(url: str, n: int, states: tuple[str, ...], timeout: float = 1800) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        js = jobs(url)
        if len(js) >= n and all(j.state in states for j in js):
            return js
        bad = [j for j in js if j.state == "failed"]
        if bad:
            raise RuntimeError(f"job {bad[0].id} failed: {bad[0].error}")
        time.sleep(0.1)
    raise TimeoutError(f"{n} jobs not {states} after {timeout} s")


def send(node: NodeProcess, work: Path, seed: int, slices: int, size: int) -> None:
    src = make_series(SeriesSpec(weighting="T1", slices=slices, rows=size, cols=size, seed=seed))
    res = storescu(node.port, write_series(src, work / f"s{seed}"))
    if res.returncode != 0:
        raise RuntimeError(res.stderr)


def run(pg: PostgresServer, n: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    url = pg.create_database(f"bench_{n}_{int(time.time())}")
    folder = work / f"w{n}"
    storage = folder / "shared"
    with DcmtkStoreSCP(folder / "pacs", ae_title="PACS") as pacs:
        dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
        node = NodeProcess(folder / "serve", destinations=dest, **sections(storage, url, args.poll))
        node.start()
        for i in range(args.series):
            send(node, folder / "in", 1000 * n + i, args.slices, args.size)
        wait_jobs(url, args.series, ("queued",))
        node.stop()
        workers = [WorkerProcess(folder / f"worker-{i}", sections(storage, url, args.poll), dest) for i in range(n)]
        try:
            for w in workers:
                w.start()
            burst = wait_jobs(url, args.series, ("done",))
            first = min(j.started_at for j in burst if j.started_at)
            last = max(j.finished_at for j in burst if j.finished_at)
            span = (last - first).total_seconds()
            claims = max(j.runs for j in burst)  # 1: no job was claimed twice
            for w in workers:
                w.wait_polling()
            node.start()
            latencies = []
            for k in range(args.probes):
                time.sleep(args.poll * 1.37)  # a random-ish phase against the workers' polling
                send(node, folder / "probe", 10_000 * n + k, args.slices, args.size)
                js = wait_jobs(url, args.series + k + 1, ("done",))
                j = js[-1]
                assert j.started_at is not None
                latencies.append((j.started_at - j.created_at).total_seconds())
            node.stop()
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.stop()
            node.stop()
    return {"workers": n, "jobs": args.series, "span_s": span, "jobs_per_hour": args.series / span * 3600,
            "claim_median_s": statistics.median(latencies), "claim_max_s": max(latencies), "max_runs": claims}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="worker counts to compare")
    ap.add_argument("--series", type=int, default=8, help="series in each burst")
    ap.add_argument("--probes", type=int, default=5, help="single series for the claim latency")
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--poll", type=float, default=0.5, help="worker.poll_seconds (the default is 0.5)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which(dcmtk("storescu")) is None:
        print("dcmtk is not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="dicomnode-bench-workers-"))
    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"series: {args.series} per burst, T1 {args.slices}x{args.size}x{args.size}; poll_seconds {args.poll}")
    rows = []
    with PostgresServer(fsync=True) as pg:
        print(f"PostgreSQL: {pg.bindir}")
        for n in (int(x) for x in args.workers.split(",")):
            r = run(pg, n, args, work)
            rows.append(r)
            print(f"{n} worker(s): {r['jobs']} jobs in {r['span_s']:.1f} s = {r['jobs_per_hour']:.0f} jobs/h; "
                  f"claim latency median {r['claim_median_s'] * 1000:.0f} ms, max {r['claim_max_s'] * 1000:.0f} ms; "
                  f"most runs of a job {r['max_runs']}",
                  flush=True)
    base = rows[0]["jobs_per_hour"]
    print("\n| workers | jobs/h | vs first | claim latency median (ms) | max (ms) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['jobs_per_hour']:.0f} | {r['jobs_per_hour'] / base:.2f}x | "
              f"{r['claim_median_s'] * 1000:.0f} | {r['claim_max_s'] * 1000:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
