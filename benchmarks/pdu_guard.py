#!/usr/bin/env python3
"""CPU cost of reading PDUs through ``dicom_node.net.transport.GuardedSocket`` versus a plain socket.

Reads ``--pdus`` P-DATA-TF PDUs of ``--kb`` KiB (default: one 256x256x16-bit
instance per PDU, as the ingest benchmark sends) over a loopback socket pair,
the way pynetdicom's DUL does (``AssociationSocket.recv(6)`` then
``recv(length)``), through both socket classes, alternating ``--rounds`` times.
Prints the median microseconds per PDU of each and their difference.

Usage: python benchmarks/pdu_guard.py [--pdus 2000] [--kb 132] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import threading
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.net.transport import GuardedSocket, Limits  # noqa: E402


def read_like_pynetdicom(sock: socket.socket, n: int) -> None:
    """What pynetdicom 3.0's DUL + AssociationSocket.recv do per PDU: 6 bytes, then the rest in <= 4096-byte calls."""
    for _ in range(n):
        head = bytearray()
        while len(head) < 6:
            head += sock.recv(6 - len(head))
        length = struct.unpack(">L", head[2:6])[0]
        body = bytearray()
        while len(body) < length:
            body += sock.recv(min(4096, length - len(body)))


def one(guarded: bool, pdus: int, kb: int) -> float:
    a, b = socket.socketpair()
    if guarded:
        g = GuardedSocket(b.family, b.type, b.proto, fileno=b.detach())
        g.guard(Limits(acse_timeout=30, network_timeout=60, max_pdu=max(262144, kb << 10), max_pending=16), "bench")
        g.pdus_read = 1  # past the association request: P-DATA-TF may be max_pdu long
        b = g
    pdu = struct.pack(">BBL", 0x04, 0, kb << 10) + b"\0" * (kb << 10)
    sender = threading.Thread(target=lambda: [a.sendall(pdu) for _ in range(pdus)], daemon=True)
    t0 = time.perf_counter()
    sender.start()
    read_like_pynetdicom(b, pdus)
    took = time.perf_counter() - t0
    sender.join()
    a.close()
    b.close()
    return took / pdus * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pdus", type=int, default=2000)
    ap.add_argument("--kb", type=int, default=132)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    plain, guarded = [], []
    for _ in range(args.rounds):
        plain.append(one(False, args.pdus, args.kb))
        guarded.append(one(True, args.pdus, args.kb))
    p, g = statistics.median(plain), statistics.median(guarded)
    print(f"{args.pdus} PDUs of {args.kb} KiB, {args.rounds} rounds: plain socket {p:.1f} us/PDU, "
          f"GuardedSocket {g:.1f} us/PDU, difference {g - p:+.1f} us/PDU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
