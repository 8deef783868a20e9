"""Hostile peers on raw sockets, and the serve process's memory, for denial-of-service tests and benchmarks."""

from __future__ import annotations

import socket
import struct
import time
import zlib
from pathlib import Path

A_ASSOCIATE_RQ, P_DATA_TF, A_ABORT = 0x01, 0x04, 0x07


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6 bytes that open a PDU: type, reserved, 32-bit big-endian length."""
    return struct.pack(">BBL", pdu_type, 0, length)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def stalled_header(port: int, length: int = 1000) -> socket.socket:
    """A connection that sends the 6-byte header of an A-ASSOCIATE-RQ and then nothing."""
    s = connect(port)
    s.sendall(pdu_header(A_ASSOCIATE_RQ, length))
    return s


def wait_closed(s: socket.socket, timeout: float) -> tuple[float | None, bytes]:
    """Read until the peer closes: (seconds it took or None if still open after *timeout*, bytes received)."""
    start = time.monotonic()
    got = b""
    while time.monotonic() - start < timeout:
        s.settimeout(max(0.05, timeout - (time.monotonic() - start)))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except OSError:  # reset: closed too
            return time.monotonic() - start, got
        if not chunk:
            return time.monotonic() - start, got
        got += chunk
    return None, got


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of *pid* in KiB (``VmHWM`` gives the peak since start)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def stream_oversized_pdu(port: int, declared: int = 0xFFFFFFFF, send_mb: int = 256) -> int:
    """Declare an A-ASSOCIATE-RQ of *declared* bytes and stream up to *send_mb* MB of it.

    Returns how many bytes the node took before closing the connection.
    """
    s = connect(port)
    s.sendall(pdu_header(A_ASSOCIATE_RQ, declared))
    chunk = b"\0" * (1 << 20)
    sent = 0
    try:
        for _ in range(send_mb):
            s.settimeout(10)
            sent += s.send(chunk)
    except OSError:
        pass
    finally:
        s.close()
    return sent


def deflate_bomb(path: Path, template_path: Path, pixel_bytes: int, rows: int | None = None,
                 cols: int | None = None, padding_bytes: int = 0) -> Path:
    """Write a Deflated Explicit VR Little Endian file whose Pixel Data inflates to *pixel_bytes* zeros.

    *template_path* is an uncompressed explicit VR little endian MR file (its
    header is reused); *rows*/*cols* overwrite what the header declares;
    *padding_bytes* adds a Data Set Trailing Padding element of that many
    zeros after the pixel data.  The bomb is compressed as a stream, so
    neither this process nor the file holds the inflated bytes.
    """
    from pydicom import dcmread
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(template_path)
    del ds.PixelData
    if rows:
        ds.Rows = rows
    if cols:
        ds.Columns = cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    with open(path, "wb") as out:
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        out.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        out.write(z.compress(head.getvalue()))
        out.write(z.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)))
        zeros = b"\0" * (1 << 22)

        def zero_fill(left: int) -> None:
            while left > 0:
                n = min(left, len(zeros))
                out.write(z.compress(zeros[:n]))
                left -= n

        zero_fill(pixel_bytes)
        if padding_bytes:
            out.write(z.compress(struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, padding_bytes)))
            zero_fill(padding_bytes)
        out.write(z.flush())
    return path
