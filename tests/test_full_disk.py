"""A really full disk (no free-space floor) is answered 0xA700 and leaves no partial file behind.

Needs root to mount a 20 MB tmpfs; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterator

import pytest

from dicomgen import SeriesSpec, make_series
from nodeproc import NodeProcess, pynetdicom_send
from tmpfs import mounted_tmpfs

SUCCESS, OUT_OF_RESOURCES = 0x0000, 0xA700


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", 20) as disk:
        yield disk


def fill(disk: Path, leave_mb: int) -> Path:
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_mb * 2**20))
    return filler


def test_a_full_disk_is_answered_out_of_resources_and_leaves_no_partial_file(small_disk: Path, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", storage={"dir": str(small_disk / "var"), "min_free_mb": 0}).start()
    try:
        series = make_series(SeriesSpec(slices=10, rows=724, cols=724))  # about 1 MB each
        filler = fill(small_disk, leave_mb=4)
        statuses = pynetdicom_send(node.port, series)
        # one association to the end: a status for every instance, none lost to an abort
        assert None not in statuses, statuses
        assert OUT_OF_RESOURCES in statuses and statuses[0] == SUCCESS, statuses
        ok = [ds for ds, st in zip(series, statuses) if st == SUCCESS]
        assert not list((node.storage / "spool" / ".incoming").iterdir())  # no partial file left
        # every instance answered success is stored and in the ledger
        con = sqlite3.connect(node.storage / "ledger.db")
        try:
            stored = {r[0] for r in con.execute("select sop_instance_uid from instances")}
        finally:
            con.close()
        assert stored == {ds.SOPInstanceUID for ds in ok}
        spool = node.storage / "spool" / series[0].StudyInstanceUID / series[0].SeriesInstanceUID
        assert {p.stem for p in spool.iterdir()} == stored
        # space again: the rest is taken
        filler.unlink()
        rest = [ds for ds, st in zip(series, statuses) if st != SUCCESS]
        assert pynetdicom_send(node.port, rest) == [SUCCESS] * len(rest)
        assert "Traceback" not in node.log()
    finally:
        node.stop()
