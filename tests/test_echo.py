"""`dicomnode echo`: C-ECHO each configured destination and say what it answered."""

from __future__ import annotations

from pathlib import Path

from builtjob import make_node
from netutil import DcmtkStoreSCP, free_port, needs_dcmtk


@needs_dcmtk
def test_echo_says_which_destination_answers(tmp_path: Path) -> None:
    closed = free_port()
    with DcmtkStoreSCP(tmp_path / "scp") as scp, DcmtkStoreSCP(tmp_path / "no", extra=["--refuse"]) as refusing:
        node = make_node(tmp_path / "node", [
            {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port},
            {"name": "refusing", "ae_title": "STORESCP", "host": "127.0.0.1", "port": refusing.port},
            {"name": "offline", "ae_title": "PACS2", "host": "127.0.0.1", "port": closed},
        ])
        every = node.cli("echo", "--timeout", "3")
        one = node.cli("echo", "pacs")
        unknown = node.cli("echo", "nosuch")
    lines = every.stdout.splitlines()
    assert every.returncode == 1 and len(lines) == 3, every
    assert lines[0].startswith(f"pacs: STORESCP@127.0.0.1:{scp.port}: ok: C-ECHO status 0x0000")
    assert lines[1].startswith("refusing: ") and "FAILED: association rejected" in lines[1]
    assert lines[2].startswith(f"offline: PACS2@127.0.0.1:{closed}: FAILED: cannot connect")
    assert one.returncode == 0 and one.stdout.count("\n") == 1 and ": ok: " in one.stdout
    assert unknown.returncode == 2 and "pacs, refusing, offline" in unknown.stderr


def test_echo_without_destinations_is_a_usage_error(tmp_path: Path) -> None:
    res = make_node(tmp_path / "node", []).cli("echo")
    assert res.returncode == 2 and "no [[destinations]]" in res.stderr
