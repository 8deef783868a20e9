"""`dicomnode serve` on a port that is already in use: one line, exit 2, nothing created on disk."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from nodeproc import DICOMNODE, node_sections, write_config


def test_a_port_in_use_stops_serve_before_it_creates_the_ledger(tmp_path: Path) -> None:
    with socket.socket() as other:  # someone else listens there
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        config = write_config(tmp_path, node_sections(tmp_path, port))
        res = subprocess.run([*DICOMNODE, "serve", "--config", str(config)], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"dicomnode: cannot start: Address already in use (127.0.0.1:{port})"]
    assert not (tmp_path / "var").exists()  # no spool, no var/ledger.db
