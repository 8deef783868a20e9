"""Intake of one received instance: validate, spool durably, record, decide the status.

The C-STORE handler in :mod:`dicom_node.net.scp` calls :meth:`Intake.store` and
returns its status; nothing here knows about associations.
"""

from __future__ import annotations

import filecmp
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.values import convert_UI

from dicom_node import incoming, selection
from storage.ledger import InstanceConflict, InstanceRecord, Ledger
from storage.spool import AlreadySpooled, Spool, SpoolFull, valid_uid
from vocab.dimse import StoreStatus

log = logging.getLogger(__name__)

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    reason: str = ""
    series_uid: str | None = None
    duplicate: bool = False
    size_bytes: int = 0  # of the stored file


class Malformed(ValueError):
    def __init__(self, reason: str, status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND) -> None:
        super().__init__(reason)
        self.status = status


@lru_cache(maxsize=256)
def _requires_pixels(sop_class_uid: str) -> bool:
    return "Image Storage" in UID(sop_class_uid).name


_META_START = 132  # 128-byte preamble + b"DICM"

#: Deflated data sets: elements before the pixel data may inflate to at most this much,
#: whatever ``max_inflated_mb`` says (Enhanced MR headers of thousands of frames are a few MB)
HEADER_ALLOWANCE = 64 << 20
#: ... and elements after the pixel data (padding, trailing private tags) to this much
TRAILER_ALLOWANCE = 64 << 10
DEFAULT_MAX_INFLATED = 1024 << 20
_PROBE_FIRST = 1 << 20  # look for the pixel data after this much inflated data, then after twice as much ...
_IN_CHUNK, _OUT_CHUNK = 64 << 10, 1 << 20
_PIXEL_BITS = {0x7FE00008: 32, 0x7FE00009: 64}  # Float / Double Float Pixel Data: fixed bits per sample


def inflated_path(path: Path) -> Path:
    """Where the inflated data set of a deflated file *path* is written (next to it; the caller deletes it)."""
    return path.with_name(path.name + ".inflated")


def _meta_end(fp: Any) -> int:
    fp.seek(_META_START)
    head = fp.read(12)  # (0002,0000) UL 4: the meta group's length
    if len(head) < 12 or head[:8] != b"\x02\x00\x00\x00UL\x04\x00":
        raise ValueError("no file meta group length")
    return _META_START + 12 + int.from_bytes(head[8:], "little")


def _pixel_budget(path: Path) -> int | None:
    """Inflated bytes the data set in *path* (inflated so far) may have in all, once its pixel data is reached.

    None while the elements before the pixel data are still incomplete.  The
    budget is where the pixel data starts + what Rows, Columns, Samples per
    Pixel, Number of Frames and Bits Allocated say it needs + a trailer
    allowance; raises :class:`Malformed` if the Pixel Data element itself
    declares more.
    """
    try:
        with open(path, "rb") as fp:
            ds = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: int(tag) in _PIXEL_TAGS,
                              defer_size=4096)
            at = fp.tell()
            head = fp.read(12)
    except Exception:  # cut off mid-element: not there yet
        return None
    if len(head) < 12:
        return None
    group, elem, _vr, _res, declared = struct.unpack("<HH2sHL", head)
    tag = group << 16 | elem
    if tag not in _PIXEL_TAGS:
        return None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = _PIXEL_BITS.get(tag) or int(ds.BitsAllocated)
        need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * max(frames, 1) * bits // 8
    except Exception:
        raise Malformed("deflated image without a valid pixel description (Rows, Columns, BitsAllocated)") from None
    need += need & 1  # even length
    if declared != _UNDEFINED and declared > need:
        raise Malformed(f"deflated Pixel Data declares {declared} bytes, the image needs {need}: refused before "
                        f"inflating it")
    return at + 12 + need + TRAILER_ALLOWANCE


def inflate_capped(path: Path, out: Path, max_inflated: int) -> int:
    """Inflate the deflated data set of *path* into *out* as a stream; returns its size.

    Memory stays at a few MB whatever the compression ratio; inflation stops
    with :class:`Malformed` as soon as the data set grows beyond what its own
    header says the image needs (see :func:`_pixel_budget`), beyond
    ``HEADER_ALLOWANCE`` before its pixel data, or beyond *max_inflated*.
    """
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    total, probe_at = 0, _PROBE_FIRST
    budget: int | None = None  # known once the pixel data is reached

    def check() -> None:
        nonlocal budget, probe_at
        if budget is None and total >= probe_at:
            dst.flush()
            budget = _pixel_budget(out)
            probe_at *= 2
            if budget is not None and budget - TRAILER_ALLOWANCE > max_inflated:
                raise Malformed(f"deflated image needs {budget - TRAILER_ALLOWANCE} bytes inflated, more than "
                                f"max_inflated_mb allows ({max_inflated}); refused before inflating it")
        if budget is None:
            limit, why = HEADER_ALLOWANCE, "allowed before the pixel data"
        else:
            limit, why = budget, "its pixel description needs, with a trailer allowance"
        if max_inflated < limit:
            limit, why = max_inflated, "max_inflated_mb allows"
        if total > limit:
            raise Malformed(f"deflated data set would inflate to more than the {limit} bytes {why}; refused")

    with open(path, "rb") as src, open(out, "wb") as dst:
        src.seek(_meta_end(src))
        while not z.eof:
            data = z.unconsumed_tail or src.read(_IN_CHUNK)
            if not data:
                raise Malformed("deflated data set ends early")
            try:
                piece = z.decompress(data, _OUT_CHUNK)
            except zlib.error as exc:
                raise Malformed(f"deflated data set is corrupt: {exc}") from None
            dst.write(piece)
            total += len(piece)
            check()
        if budget is None:  # a small data set: look once, at its end
            probe_at = 0
            check()
    return total


def read_header(path: Path, transfer_syntax: UID, max_inflated: int = DEFAULT_MAX_INFLATED) -> Dataset:
    """Parse every element of a received file, deferring large values (pixel data).

    pynetdicom wrote the file meta itself, from the negotiated *transfer_syntax*,
    so the data set is read straight after it: parsing the meta again would cost
    as much as every check below together.  A deflated data set is inflated as a
    stream, with caps (:func:`inflate_capped`), into :func:`inflated_path`, and
    read from there; the caller deletes that file.
    """
    try:
        if transfer_syntax.is_deflated:
            plain = inflated_path(path)
            inflate_capped(path, plain, max_inflated)
            with open(plain, "rb") as fp:
                ds = read_dataset(fp, False, True, defer_size=4096)
            return FileDataset(str(plain), ds, is_implicit_VR=False, is_little_endian=True)
        with open(path, "rb") as fp:
            fp.seek(_meta_end(fp))
            implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
            ds = read_dataset(fp, implicit, little, defer_size=4096)
        # a FileDataset knows its file: deferred values (pixel data, large sequences such
        # as Enhanced MR functional groups) are read from it when asked for
        return FileDataset(str(path), ds, is_implicit_VR=implicit, is_little_endian=little)
    except Malformed:
        raise
    except Exception as exc:  # any parse failure means a malformed instance
        raise Malformed(f"cannot parse dataset: {type(exc).__name__}: {exc}") from None


def _uid(ds: Dataset, tag: int) -> str:
    """A UID element's value ("" if absent), converted straight from its encoded bytes."""
    elem = ds.get_item(tag)
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement):  # not yet decoded: skip pydicom's general element conversion
        return str(convert_UI(elem.value, elem.is_little_endian)) if elem.value else ""
    return str(elem.value or "")


def validate(ds: Dataset, size: int, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: UID,
             f: dict[str, Any]) -> tuple[str, str]:
    """Check an instance before it is accepted; returns (study_uid, series_uid).

    *size* is the received file's size; *f* holds the instance's selection
    facts (rows, columns, frames, samples, bits).
    """
    ds_class = _uid(ds, 0x00080016)  # SOP Class UID
    ds_inst = _uid(ds, 0x00080018)  # SOP Instance UID
    if ds_class and ds_class != sop_class_uid:
        raise Malformed(
            f"SOPClassUID {ds_class} in the data set differs from the request's {sop_class_uid}",
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if ds_inst != sop_instance_uid:
        raise Malformed(f"SOPInstanceUID in the data set ({ds_inst or 'missing'}) differs from the request's")
    study = _uid(ds, 0x0020000D)  # Study Instance UID
    series = _uid(ds, 0x0020000E)  # Series Instance UID
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
            if not transfer_syntax.is_deflated and tell + length > size:  # deflated: offsets are in the inflated stream
                raise Malformed(f"truncated: pixel data needs {length} bytes, file ends {size - tell} bytes after its start")
            if elem.tag == 0x7FE00010 and not transfer_syntax.is_compressed:
                dims = [f.get(k) for k in ("rows", "cols", "samples", "frames", "bits")]
                sizes = [d for d in dims if isinstance(d, int) and d > 0]
                if len(sizes) != len(dims):
                    raise Malformed("image pixel description (Rows, Columns, BitsAllocated) missing or invalid")
                rows, cols, samples, frames, bits = sizes
                expected = rows * cols * samples * frames * bits // 8
                if length < expected:
                    raise Malformed(f"truncated: pixel data has {length} bytes, {expected} expected")
    return study, series


def header_facts(ds: Dataset) -> dict[str, Any]:
    try:
        return selection.facts(ds)
    except Exception as exc:  # a value pydicom cannot convert
        raise Malformed(f"unreadable header value: {type(exc).__name__}: {exc}") from None


def same_content(stored: Path, received: Path) -> bool:
    """True if *received* holds the same data set as *stored*: the same bytes, or (in another
    transfer syntax) the same elements and the same decoded pixels."""
    if stored.stat().st_size == received.stat().st_size and filecmp.cmp(stored, received, shallow=False):
        return True
    try:
        a, b = dcmread(stored), dcmread(received)
        if a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID:
            return False  # same encoding, other bytes: other content
        pa = a.pixel_array if "PixelData" in a else None
        pb = b.pixel_array if "PixelData" in b else None
        if (pa is None) != (pb is None) or (pa is not None and pb is not None and not np.array_equal(pa, pb)):
            return False
        for ds in (a, b):
            if "PixelData" in ds:
                del ds.PixelData
        return bool(a == b)
    except Exception:  # cannot compare: treat as other content
        return False


class Intake:
    """*overwrite_instances*: what a resend of a stored SOP Instance UID with other content does.

    ``False`` (the default): it is refused with 0xC231 and the stored instance
    stays.  ``True``: it replaces the stored one, a note is written in the
    ledger and the series is processed again.  An identical resend is always
    answered with success and changes nothing; a SOP Instance UID stored in
    another series is always refused (0xC230).  Refusals are recorded as
    rejections.
    """

    def __init__(self, spool: Spool, ledger: Ledger, overwrite_instances: bool = False,
                 max_inflated: int = DEFAULT_MAX_INFLATED) -> None:
        self.spool = spool
        self.ledger = ledger
        self.overwrite_instances = overwrite_instances
        self.max_inflated = max_inflated  # bytes a deflated data set may inflate to

    def store(self, tmp: Path, *, calling_aet: str, sop_class_uid: str, sop_instance_uid: str,
              transfer_syntax: str) -> StoreResult:
        """Accept the received file *tmp* (in the spool's incoming folder) or say why not.

        Holds the spool's shared lock throughout: retention never removes a series' files (and rows)
        between our look at the ledger and our record in it.
        """
        with self.spool.shared():
            return self._store(tmp, calling_aet=calling_aet, sop_class_uid=sop_class_uid,
                               sop_instance_uid=sop_instance_uid, transfer_syntax=transfer_syntax)

    def _store(self, tmp: Path, *, calling_aet: str, sop_class_uid: str, sop_instance_uid: str,
               transfer_syntax: str) -> StoreResult:
        failed = incoming.write_error(tmp)
        if failed is not None:  # the disk filled up while it arrived: nothing usable was kept
            return self._reject(StoreStatus.OUT_OF_RESOURCES,
                                f"cannot write spool: {failed.strerror or failed} while receiving",
                                calling_aet, sop_class_uid, sop_instance_uid, tmp)
        try:
            self.spool.start_writeback(tmp)  # the disk writes while the header is checked
            ts = UID(transfer_syntax)
            size = tmp.stat().st_size
            try:
                ds = read_header(tmp, ts, self.max_inflated)
                f = header_facts(ds)
                if ts.is_deflated:  # checked as the plain explicit VR data set it inflated to
                    study, series = validate(ds, inflated_path(tmp).stat().st_size, sop_class_uid,
                                             sop_instance_uid, ExplicitVRLittleEndian, f)
                else:
                    study, series = validate(ds, size, sop_class_uid, sop_instance_uid, ts, f)
                del ds
            finally:
                if ts.is_deflated:
                    _unlink(inflated_path(tmp))
            prior = self.ledger.stored_instance(sop_instance_uid)
            replaced = False
            if prior is not None:
                if prior.series_uid != series:
                    raise InstanceConflict(sop_instance_uid, prior.series_uid)
                answer = self._resent(prior.path, prior.transfer_syntax, tmp, study, series, sop_class_uid,
                                      sop_instance_uid, calling_aet, f, size)
                if answer is not None:
                    return answer
                replaced = True
            try:
                spooled = self.spool.commit(tmp, study, series, sop_instance_uid, size, replace=replaced)
            except AlreadySpooled:
                # another association stored this UID between our look at the ledger and now
                rel = self.spool.relpath_for(study, series, sop_instance_uid)
                answer = self._resent(rel, None, tmp, study, series, sop_class_uid, sop_instance_uid, calling_aet,
                                      f, size)
                if answer is not None:
                    return answer
                replaced = True
                spooled = self.spool.commit(tmp, study, series, sop_instance_uid, size)
            try:
                outcome = self.ledger.record_instance(
                    self._record(spooled.relpath, transfer_syntax, study, series, sop_class_uid, sop_instance_uid,
                                 calling_aet, f, spooled.size), replaced=replaced)
            except InstanceConflict:
                # stored in another series by a concurrent association meanwhile: ours is not kept
                self._unlink(spooled.path)
                raise
        except InstanceConflict as exc:
            return self._reject(StoreStatus.UID_IN_ANOTHER_SERIES, f"{exc}; refused (a SOP Instance UID means one "
                                "instance)", calling_aet, sop_class_uid, sop_instance_uid, tmp)
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
            log.info("series %s reopened by a %s instance (generation %d)", series,
                     "replaced" if replaced else "late", outcome.generation)
        elif replaced:
            log.info("instance %s of series %s replaced with new content", sop_instance_uid, series)
        return StoreResult(StoreStatus.SUCCESS, series_uid=series, duplicate=outcome.duplicate, size_bytes=spooled.size)

    def _resent(self, relpath: str, transfer_syntax: str | None, tmp: Path, study: str, series: str,
                sop_class_uid: str, sop_instance_uid: str, calling_aet: str, f: dict[str, Any],
                size: int) -> StoreResult | None:
        """The answer to a resend of the instance stored at *relpath*: success, changing nothing, when it is
        identical; a refusal when its content differs and overwriting is off; None: it replaces the stored one."""
        stored = self.spool.path(relpath)
        if same_content(stored, tmp):
            os.unlink(tmp)  # an identical resend: nothing changes
            if transfer_syntax is None:  # stored by a concurrent association: its encoding is the file's
                transfer_syntax = str(dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            self.ledger.record_instance(self._record(relpath, transfer_syntax, study, series, sop_class_uid,
                                                     sop_instance_uid, calling_aet, f, stored.stat().st_size))
            return StoreResult(StoreStatus.SUCCESS, series_uid=series, duplicate=True, size_bytes=size)
        if not self.overwrite_instances:
            return self._reject(StoreStatus.UID_WITH_OTHER_CONTENT,
                                f"SOP Instance UID already stored in series {series} with other content; "
                                "refused (storage.overwrite_instances = false)",
                                calling_aet, sop_class_uid, sop_instance_uid, tmp)
        return None

    @staticmethod
    def _record(relpath: str, transfer_syntax: str, study: str, series: str, sop_class_uid: str,
                sop_instance_uid: str, calling_aet: str, f: dict[str, Any], size: int) -> InstanceRecord:
        return InstanceRecord.of(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid, study_uid=study,
                                 series_uid=series, transfer_syntax=transfer_syntax, path=relpath, size_bytes=size,
                                 calling_aet=calling_aet, facts=f)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def _reject(self, status: StoreStatus, reason: str, calling_aet: str, sop_class_uid: str,
                sop_instance_uid: str, tmp: Path) -> StoreResult:
        log.warning("rejected instance %s from %s: 0x%04X %s", sop_instance_uid[:64], calling_aet, status, reason)
        try:
            self.ledger.record_rejection(calling_aet=calling_aet, sop_instance_uid=sop_instance_uid,
                                         sop_class_uid=sop_class_uid, status=int(status), reason=reason)
        except Exception:
            log.exception("could not record the rejection in the ledger")
        _unlink(tmp)
        return StoreResult(status, reason)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
