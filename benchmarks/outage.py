#!/usr/bin/env python3
"""A PACS outage with the default delivery settings: is the series delivered when the PACS returns?

``dicomnode serve`` (default ``[delivery]``: retries from 10 s, doubling, at most 10 min apart, for
24 h) receives a small T1 series while its only destination is down; after ``--outage`` seconds
(default 600, ten minutes) a real dcmtk ``storescp`` starts on the destination's port.  Prints the
attempts made during the outage and how long after the PACS came back the series was stored.

Usage: python benchmarks/outage.py [--outage 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dicomgen import SeriesSpec, make_series, write_series  # noqa: E402
from netutil import DcmtkStoreSCP, free_port, storescu  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--outage", type=float, default=600.0, help="seconds the destination stays down")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
        node = NodeProcess(work / "node", [dest], series={"quiet_seconds": 1.0, "min_slices": 4},
                           model={"device": "cpu"}, worker={"processes": 1, "poll_seconds": 0.2}).start()
        try:
            t1 = make_series(SeriesSpec(weighting="T1", slices=8, rows=64, cols=64))
            res = storescu(node.port, write_series(t1, work / "t1"))
            assert res.returncode == 0, res.stderr
            uid = str(t1[0].SeriesInstanceUID)
            t_down = time.monotonic()
            with DcmtkStoreSCP(work / "pacs", ae_title="PACS", port=port, extra=[]) as scp:
                scp.stop()  # reserve nothing: the PACS is down from the start
                while time.monotonic() - t_down < args.outage:
                    time.sleep(1.0)
                st = json.loads(node.cli("status", "--json").stdout)
                during = next(j for j in st["jobs"] if j["source_series_uid"] == uid)
                scp.start()
                t_up = time.monotonic()
                while True:
                    st = json.loads(node.cli("status", "--json").stdout)
                    job = next(j for j in st["jobs"] if j["source_series_uid"] == uid)
                    if job["state"] in ("done", "failed") or time.monotonic() - t_up > 900:
                        break
                    time.sleep(1.0)
            print(json.dumps({"outage_s": round(args.outage), "state_at_end_of_outage": during["state"],
                              "retrying": during.get("retrying"), "attempts_during_outage": during["attempts"],
                              "final_state": job["state"], "delivered_after_pacs_back_s": round(time.monotonic() - t_up, 1),
                              "deliveries": job["deliveries"]}, indent=1))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
