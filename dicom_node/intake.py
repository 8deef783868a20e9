"""Intake of one received instance: validate, spool durably, record, decide the status.

The C-STORE handler in :mod:`dicom_node.scp` calls :meth:`Intake.store` and
returns its status; nothing here knows about associations.
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node import selection
from storage.ledger import InstanceRecord, Ledger
from storage.spool import Spool, SpoolFull, valid_uid

log = logging.getLogger(__name__)

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_UNDEFINED = 0xFFFFFFFF


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses we return (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    reason: str = ""
    series_uid: str | None = None
    duplicate: bool = False


class Malformed(ValueError):
    def __init__(self, reason: str, status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.status = status


def _requires_pixels(sop_class_uid: str) -> bool:
    return "Image Storage" in UID(sop_class_uid).name


def read_header(path: Path) -> Dataset:
    """Parse every element of a received file, deferring large values (pixel data)."""
    try:
        return dcmread(path, defer_size=4096)
    except Exception as exc:  # any parse failure means a malformed instance
        raise Malformed(f"cannot parse dataset: {type(exc).__name__}: {exc}") from None


def validate(ds: Dataset, path: Path, sop_class_uid: str, sop_instance_uid: str) -> tuple[str, str]:
    """Check an instance before it is accepted; returns (study_uid, series_uid)."""
    ds_class = str(ds.get("SOPClassUID", ""))
    ds_inst = str(ds.get("SOPInstanceUID", ""))
    if ds_class and ds_class != sop_class_uid:
        raise Malformed(
            f"SOPClassUID {ds_class} in the data set differs from the request's {sop_class_uid}",
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if ds_inst != sop_instance_uid:
        raise Malformed(f"SOPInstanceUID in the data set ({ds_inst or 'missing'}) differs from the request's")
    study = str(ds.get("StudyInstanceUID", ""))
    series = str(ds.get("SeriesInstanceUID", ""))
    for name, uid in (("SOPInstanceUID", ds_inst), ("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if not valid_uid(uid):
            raise Malformed(f"invalid {name} {uid[:80]!r}" if uid else f"missing {name}")
    if _requires_pixels(sop_class_uid):
        elem = next((ds.get_item(t, keep_deferred=True) for t in _PIXEL_TAGS if t in ds), None)
        if elem is None:
            raise Malformed("image without pixel data")
        # a RawDataElement when deferred (large); a decoded DataElement when small
        length = getattr(elem, "length", None)
        tell = getattr(elem, "value_tell", None)
        if length is None and elem.value is not None:
            length, tell = len(elem.value), 0
        if length is not None and length != _UNDEFINED and tell is not None:
            deflated = ds.file_meta.TransferSyntaxUID.is_deflated  # offsets are in the inflated stream
            if not deflated and tell + length > path.stat().st_size:
                raise Malformed(f"truncated: pixel data needs {length} bytes, file ends {path.stat().st_size - tell} bytes after its start")
            if elem.tag == 0x7FE00010 and not ds.file_meta.TransferSyntaxUID.is_compressed:
                try:
                    expected = (
                        int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated)
                    ) // 8
                except (AttributeError, TypeError, ValueError):
                    raise Malformed("image pixel description (Rows, Columns, BitsAllocated) missing or invalid") from None
                if length < expected:
                    raise Malformed(f"truncated: pixel data has {length} bytes, {expected} expected")
    return study, series


class Intake:
    def __init__(self, spool: Spool, ledger: Ledger) -> None:
        self.spool = spool
        self.ledger = ledger

    def store(self, tmp: Path, *, calling_aet: str, sop_class_uid: str, sop_instance_uid: str,
              transfer_syntax: str) -> StoreResult:
        """Accept the received file *tmp* (in the spool's incoming folder) or say why not."""
        try:
            ds = read_header(tmp)
            study, series = validate(ds, tmp, sop_class_uid, sop_instance_uid)
            f = selection.facts(ds)
            del ds
            spooled = self.spool.commit(tmp, study, series, sop_instance_uid)
            outcome = self.ledger.record_instance(
                InstanceRecord(
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    study_uid=study,
                    series_uid=series,
                    transfer_syntax=transfer_syntax,
                    path=spooled.relpath,
                    size_bytes=spooled.size,
                    calling_aet=calling_aet,
                    modality=f["modality"] or None,
                    description=f["description"] or None,
                    attrs=f,
                )
            )
        except Malformed as exc:
            return self._reject(exc.status, str(exc), calling_aet, sop_class_uid, sop_instance_uid, tmp)
        except SpoolFull as exc:
            return self._reject(StoreStatus.OUT_OF_RESOURCES, exc.strerror or str(exc), calling_aet,
                                sop_class_uid, sop_instance_uid, tmp)
        except Exception as exc:  # ledger down, unexpected I/O error: never report success
            log.exception("store of an instance from %s failed", calling_aet)
            return self._reject(StoreStatus.OUT_OF_RESOURCES, f"{type(exc).__name__}: {exc}", calling_aet,
                                sop_class_uid, sop_instance_uid, tmp)
        if outcome.reopened:
            log.info("series %s reopened by a late instance (generation %d)", series, outcome.generation)
        return StoreResult(StoreStatus.SUCCESS, series_uid=series, duplicate=outcome.duplicate)

    def _reject(self, status: StoreStatus, reason: str, calling_aet: str, sop_class_uid: str,
                sop_instance_uid: str, tmp: Path) -> StoreResult:
        log.warning("rejected instance %s from %s: 0x%04X %s", sop_instance_uid[:64], calling_aet, status, reason)
        try:
            self.ledger.record_rejection(calling_aet=calling_aet, sop_instance_uid=sop_instance_uid,
                                         sop_class_uid=sop_class_uid, status=int(status), reason=reason)
        except Exception:
            log.exception("could not record the rejection in the ledger")
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return StoreResult(status, reason)
