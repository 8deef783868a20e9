#!/usr/bin/env python3
"""What hostile peers cost a real ``dicomnode serve``: memory and the time they lock senders out.

Three measurements, each against a fresh ``serve`` (default config except a
loopback port, no workers), with raw sockets and a pynetdicom SCU:

* ``pdu``: a peer declares a 4 GiB A-ASSOCIATE-RQ and streams ``--pdu-mb`` MB of it;
  resident memory of serve (VmRSS sampled every 20 ms, and VmHWM) above idle.
* ``deflate``: ``--parallel`` SCUs at once each send a deflate bomb (Deflated Explicit VR
  Little Endian, 64x64 image whose Pixel Data inflates to ``--bomb-mb`` MB of zeros);
  memory above idle, and the statuses answered.
* ``slow``: ten connections each send a 6-byte PDU header and stall; how long a
  legitimate C-ECHO sender (retrying every 0.2 s) waits until it gets an association,
  against ``acse_timeout`` (``--acse-timeout``, default 30 s as shipped), measured 2 s after
  they connected, next to one C-ECHO association without them.

Run it against another tree (e.g. the code before the fixes) with
``PYTHONPATH=<tree>``; a peer that hangs the node is reported as such after ``--give-up`` s.

Usage: python benchmarks/attacks.py [--pdu-mb 1024] [--bomb-mb 800] [--parallel 4] [--acse-timeout 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dicomgen import SeriesSpec, make_series  # noqa: E402
from nodeproc import NodeProcess  # noqa: E402
from rawpeer import deflate_bomb, rss_kb, stalled_header, stream_oversized_pdu  # noqa: E402


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.idle = pid, rss_kb(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, KeyError):
                return

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        hwm = rss_kb(self.pid, "VmHWM")
        return {"idle_mb": self.idle / 1024, "peak_above_idle_mb": (self.peak - self.idle) / 1024,
                "vmhwm_above_idle_mb": (hwm - self.idle) / 1024}


def node(work: Path, name: str, **node_over: float) -> NodeProcess:
    return NodeProcess(work / name, node=dict(node_over)).start()


def finish(n: NodeProcess, give_up: float) -> str:
    try:
        n.stop(timeout=give_up)
        return "stopped"
    except subprocess.TimeoutExpired:
        return f"did not stop on SIGTERM within {give_up:g} s (killed)"


def pdu_attack(work: Path, mb: int, give_up: float) -> dict[str, object]:
    n = node(work, "pdu")
    s = Sampler(n.proc.pid)
    t0 = time.monotonic()
    taken = stream_oversized_pdu(n.port, declared=0xFFFFFFFF, send_mb=mb)
    out: dict[str, object] = {"declared_bytes": 0xFFFFFFFF, "streamed_mb": mb, "node_took_mb": taken / 2**20,
                              "seconds": time.monotonic() - t0}
    time.sleep(0.5)
    out.update(s.stop())
    out["shutdown"] = finish(n, give_up)
    return out


def deflate_attack(work: Path, bomb_mb: int, parallel: int, give_up: float) -> dict[str, object]:
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import MRImageStorage
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bomb file as it is (else the SCU inflates it itself)
    template = work / "template.dcm"
    make_series(SeriesSpec(slices=1, rows=64, cols=64))[0].save_as(template, enforce_file_format=True)
    first = deflate_bomb(work / "bomb0.dcm", template, bomb_mb << 20)
    bombs = [first] + [Path(shutil.copy(first, work / f"bomb{i}.dcm")) for i in range(1, parallel)]
    n = node(work, "deflate")
    statuses: list[object] = [None] * parallel

    def send(i: int) -> None:
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = give_up
        ae.add_requested_context(MRImageStorage, [DeflatedExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
        if assoc.is_established:
            rsp = assoc.send_c_store(bombs[i])
            statuses[i] = f"0x{int(rsp.Status):04X}" if rsp is not None and "Status" in rsp else "no answer"
            if assoc.is_established:
                assoc.release()

    s = Sampler(n.proc.pid)
    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out: dict[str, object] = {"bomb_file_kb": bombs[0].stat().st_size / 1024, "inflates_to_mb": bomb_mb,
                              "parallel": parallel, "statuses": statuses, "seconds": time.monotonic() - t0}
    out.update(s.stop())
    out["shutdown"] = finish(n, give_up)
    return out


def slow_attack(work: Path, acse_timeout: float, give_up: float) -> dict[str, object]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    n = node(work, "slow", acse_timeout=acse_timeout)
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    t0 = time.monotonic()
    quiet = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
    quiet.send_c_echo()
    quiet.release()
    unattacked = time.monotonic() - t0
    stalled = [stalled_header(n.port) for _ in range(10)]
    time.sleep(2.0)  # let serve take them in (pynetdicom builds an association object per connection)
    t0 = time.monotonic()
    waited: float | None = None
    attempts = 0
    while time.monotonic() - t0 < give_up:
        attempts += 1
        assoc = ae.associate("127.0.0.1", n.port, ae_title="DICOMNODE")
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            waited = time.monotonic() - t0
            break
        time.sleep(0.2)
    for sock in stalled:
        sock.close()
    return {"slow_connections": 10, "acse_timeout_s": acse_timeout, "attempts": attempts,
            "echo_without_attack_s": unattacked,
            "sender_waited_s": waited if waited is not None else f"locked out for more than {give_up:g} s",
            "shutdown": finish(n, give_up)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pdu-mb", type=int, default=1024)
    ap.add_argument("--bomb-mb", type=int, default=800)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--acse-timeout", type=float, default=30.0)
    ap.add_argument("--give-up", type=float, default=60.0)
    ap.add_argument("--only", choices=["pdu", "deflate", "slow"], action="append")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs of each serve)")
    args = ap.parse_args()
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the SCU's own complaints are not the figures
    which = args.only or ["pdu", "deflate", "slow"]
    report: dict[str, object] = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                                 "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="dicomnode-attacks-") as tmp:
        if args.keep:
            tmp = str(args.keep)
            Path(tmp).mkdir(parents=True, exist_ok=True)
        work = Path(tmp)
        if "pdu" in which:
            report["pdu"] = pdu_attack(work, args.pdu_mb, args.give_up)
            print(json.dumps({"pdu": report["pdu"]}), flush=True)
        if "deflate" in which:
            report["deflate"] = deflate_attack(work, args.bomb_mb, args.parallel, args.give_up)
            print(json.dumps({"deflate": report["deflate"]}), flush=True)
        if "slow" in which:
            report["slow"] = slow_attack(work, args.acse_timeout, args.give_up)
            print(json.dumps({"slow": report["slow"]}), flush=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
