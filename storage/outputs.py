"""The output tree: each job's built synthetic series, and whether it is still there and intact.

Layout under ``<storage.dir>/output``::

    job-<id>/<SOPInstanceUID>.dcm       the series built by job <id> (written by dicom_node.build.write_series)

A built output is checked (:func:`check_output`) before it is sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

__all__ = ["BuiltOutput", "OutputDamaged", "OutputTree", "check_output"]


class OutputTree:
    """``<storage.dir>/output``: one folder per job."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: int) -> Path:
        return self.root / f"job-{job_id}"

    def clear(self, job_id: int) -> Path:
        """The job's folder, emptied of files an earlier run built (a new run writes new UIDs)."""
        folder = self.job_dir(job_id)
        for old in folder.glob("*.dcm") if folder.is_dir() else []:
            old.unlink()
        return folder


class OutputDamaged(Exception):
    """The built output cannot be sent again as it is; ``str()`` says why (one line)."""


@dataclass(frozen=True)
class BuiltOutput:
    files: list[Path]
    sop_instance_uids: list[str]  # in the order of ``files``


def check_output(output_dir: str | Path | None, expected_instances: int, series_uid: str | None) -> BuiltOutput:
    """The files of a built series, each readable and of *series_uid*, exactly *expected_instances* of them."""
    if not output_dir or not expected_instances or not series_uid:
        raise OutputDamaged("no output was built")
    folder = Path(output_dir)
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) != expected_instances:
        raise OutputDamaged(f"{len(files)} of {expected_instances} built file(s) found in {folder}")
    uids: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
        except Exception as exc:  # noqa: BLE001 - any unreadable file means the output is damaged
            raise OutputDamaged(f"{f.name} cannot be read: {exc}".replace("\n", " ")) from None
        if str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise OutputDamaged(f"{f.name} is not of the built series {series_uid}")
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid or uid in uids:
            raise OutputDamaged(f"{f.name} has a missing or repeated SOP Instance UID")
        uids.append(uid)
    return BuiltOutput(files, uids)
