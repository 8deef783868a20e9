"""Deliveries lost to pynetdicom's reactor race, with threads competing for the GIL (a busy process).

Sends the same series ROUNDS times to a dcmtk storescp (one association each) while HOGS threads
spin, and counts deliveries that did not store every instance and pynetdicom's
"Received unexpected C-STORE service message" warnings.

    PYTHONPATH=. python benchmarks/delivery_race.py [--rounds 20] [--instances 50] [--hogs 2] [--timeout 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dicomgen import SeriesSpec, make_series, write_series  # noqa: E402
from netutil import DcmtkStoreSCP  # noqa: E402

from dicom_node.config import Destination  # noqa: E402
from dicom_node.net.scu import deliver  # noqa: E402


class _Unexpected(logging.Handler):
    count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected" in record.getMessage():
            _Unexpected.count += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1.0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pynetdicom").addHandler(_Unexpected())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()

    def hog() -> None:
        while not stop.is_set():
            pass

    for _ in range(a.hogs):
        threading.Thread(target=hog, daemon=True).start()
    folder = Path(tempfile.mkdtemp())
    files = write_series(make_series(SeriesSpec(slices=a.instances, rows=16, cols=16)), folder / "src")
    incomplete = 0
    t0 = time.monotonic()
    with DcmtkStoreSCP(folder / "rx", extra=["--ignore"]) as scp:
        dest = Destination("STORESCP", "127.0.0.1", scp.port)
        for _ in range(a.rounds):
            incomplete += not deliver(files, dest, calling_ae_title="BENCH", timeout=a.timeout).ok
    stop.set()
    print(f"rounds={a.rounds} instances={a.instances} hogs={a.hogs} incomplete={incomplete} "
          f"unexpected_warnings={_Unexpected.count} seconds={time.monotonic() - t0:.1f}")


if __name__ == "__main__":
    main()
