#!/usr/bin/env python3
"""What one /metrics reading of the ledger costs as the history grows.

Builds real SQLite ledgers (N series, each with an instance and a done job with five stage timings),
then times ``Ledger.tallies`` through a read-only connection, as ``/metrics`` reads it
(uncached: the node reads at most every 5 s), and the peak memory Python allocated meanwhile.

Usage: python benchmarks/metrics_scrape.py [--jobs 1000,10000,50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.monitoring.metrics import STAGE_BUCKETS, STAGES  # noqa: E402
from storage.ledger import Ledger, utcnow  # noqa: E402
from storage.models import Instance, Job, Series  # noqa: E402


def build(path: Path, jobs: int) -> None:
    """*jobs* series, each with one instance and one done job (bulk inserts: the reading is what is measured)."""
    ledger = Ledger(f"sqlite:///{path}")
    rnd = random.Random(0)
    now = utcnow()
    with ledger.session() as s, s.begin():
        for i in range(jobs):
            sr = Series(study_uid="1.2", series_uid=f"1.3.{i}", state="selected", instances=1,
                        first_received_at=now, last_received_at=now)
            s.add(sr)
            s.flush()
            s.add(Instance(sop_instance_uid=f"1.9.{i}", series_id=sr.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                           transfer_syntax="1.2.840.10008.1.2.1", path=f"1.2/1.3.{i}/1.9.{i}.dcm", size_bytes=10,
                           calling_aet="A", received_at=now, attrs={}))
            s.add(Job(series_id=sr.id, source_series_uid=sr.series_uid, generation=1, direction="t1-to-t2",
                      state="done", next_attempt_at=now, created_at=now,
                      timings={st: round(rnd.expovariate(1 / 5), 3) for st in STAGES if st != "qc"}))
    ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", default="1000,10000,50000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPU(s), "
          f"Python {platform.python_version()}")
    print("| finished jobs | tallies() median | min | peak Python memory |")
    print("|---|---|---|---|")
    for n in (int(x) for x in args.jobs.split(",")):
        with tempfile.TemporaryDirectory() as d:
            db = Path(d) / "ledger.db"
            build(db, n)
            reader = Ledger(f"sqlite:///{db}", read_only=True)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                t = reader.tallies(STAGES, STAGE_BUCKETS)
                times.append(time.perf_counter() - t0)
                assert t.stages["loading"].count == n and t.jobs["done"] == n, t.stages["loading"].count
            tracemalloc.start()  # a separate reading: tracing slows it down
            reader.tallies(STAGES, STAGE_BUCKETS)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            reader.close()
        print(f"| {n} | {statistics.median(times) * 1000:.0f} ms | {min(times) * 1000:.0f} ms | "
              f"{peak / 2**20:.1f} MB |")


if __name__ == "__main__":
    main()
