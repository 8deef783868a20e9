"""C-STORE SCU: send a set of files to one destination over one association.

Network problems never raise: :func:`deliver` always returns a
:class:`DeliveryResult` that records, per instance, the status the peer
answered (or why none came back) and whether a failure is worth retrying.

Retryable: the association could not be established, was rejected or aborted,
a timeout or network error, and the 0xA7xx "out of resources" statuses.
Permanent: every other failure status (0xA9xx, 0xCxxx, 0x0122 SOP class not
supported, ...), a SOP class for which the peer accepted no presentation
context, and unreadable files.  Warnings 0xB000, 0xB006 and 0xB007 count as
stored.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_node.config import Destination
from dicom_node.net.tls import client_context, set_nodelay
from vocab.dimse import (CANNOT_UNDERSTAND_CODES, DOES_NOT_MATCH_CODES, OUT_OF_RESOURCES_CODES, WARNING_STATUSES,
                         StoreStatus)

__all__ = ["DeliveryResult", "InstanceOutcome", "WARNING_STATUSES", "classify_status", "deliver"]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class InstanceOutcome:
    sop_instance_uid: str
    status: int | None  # the C-STORE response status; None when no response came back
    stored: bool
    retryable: bool
    detail: str


@dataclass
class DeliveryResult:
    destination: str
    outcomes: list[InstanceOutcome] = field(default_factory=list)
    error: str | None = None  # association-level problem

    @property
    def ok(self) -> bool:
        """Every instance stored (warnings included)."""
        return self.error is None and all(o.stored for o in self.outcomes)

    @property
    def retryable(self) -> bool:
        """Not ok, and every failure is worth retrying."""
        return not self.ok and all(o.stored or o.retryable for o in self.outcomes)

    @property
    def stored_count(self) -> int:
        return sum(o.stored for o in self.outcomes)


_WARNING_TEXT = {StoreStatus.COERCION_OF_DATA_ELEMENTS: "coercion of data elements",
                 StoreStatus.ELEMENTS_DISCARDED: "elements discarded",
                 StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "data set does not match SOP class"}


def classify_status(status: int) -> tuple[bool, bool, str]:
    """(stored, retryable, text) for a C-STORE response status."""
    if status == StoreStatus.SUCCESS:
        return True, False, "success"
    if status in WARNING_STATUSES:
        return True, False, f"warning 0x{status:04X}: {_WARNING_TEXT[StoreStatus(status)]}"
    if status in OUT_OF_RESOURCES_CODES:
        return False, True, f"failure 0x{status:04X}: out of resources"
    if status in DOES_NOT_MATCH_CODES:
        return False, False, f"failure 0x{status:04X}: data set does not match SOP class"
    if status in CANNOT_UNDERSTAND_CODES:
        return False, False, f"failure 0x{status:04X}: cannot understand"
    if status == StoreStatus.SOP_CLASS_NOT_SUPPORTED:
        return False, False, "failure 0x0122: SOP class not supported"
    if status == StoreStatus.CANCEL:
        return False, True, "cancelled 0xFE00"
    return False, False, f"failure 0x{status:04X}"


@dataclass
class _Item:
    path: Path
    index: int = 0
    sop_class: str = ""
    sop_instance: str = ""
    transfer_syntax: str = ""
    error: str | None = None


def _inspect(path: Path, index: int) -> _Item:
    item = _Item(path=Path(path), index=index)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        item.sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        item.sop_instance = str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
        item.transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if not (item.sop_class and item.sop_instance and item.transfer_syntax):
            item.error = "missing SOP Class/Instance UID or Transfer Syntax UID"
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a permanent failure of that file
        item.error = f"cannot read file: {exc}".replace("\n", " ")
    return item


def _contexts(items: list[_Item]) -> list[tuple[str, list[str]]]:
    """One context per SOP class (explicit + implicit LE), plus one per compressed syntax in use."""
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for it in items:
        if it.error:
            continue
        key = (it.sop_class, "")
        if key not in seen:
            seen.add(key)
            out.append((it.sop_class, list(uncompressed)))
        ts = UID(it.transfer_syntax)
        if ts.is_compressed or ts.is_deflated or not ts.is_little_endian:
            key = (it.sop_class, str(ts))
            if key not in seen:
                seen.add(key)
                out.append((it.sop_class, [str(ts)]))
    return out[:_MAX_CONTEXTS]


class _ResponsesToTheSender:
    """Work around a race in pynetdicom's requestor: keep DIMSE responses away from the association reactor.

    ``send_c_store`` pauses the reactor thread before it sends and waits for the
    response itself.  The pause handshake checks a flag the reactor only resets
    once it runs again: when the sender starts the next C-STORE before the
    reactor thread was scheduled after the previous one (a busy process, the
    GIL), the reactor is still awake, takes the C-STORE-RSP off the queue,
    logs "Received unexpected C-STORE service message" and drops it.  The
    sender then waits the whole DIMSE timeout and aborts the association.

    The reactor of a requestor only ever has to serve *requests* from the peer,
    so this wrapper around the association's own ``dimse.get_msg`` hands a
    response the reactor would take (a non-blocking call) back to the queue,
    where the waiting sender gets it.  Our associations send one request at a
    time and pynetdicom aborts after a DIMSE timeout, so a response never waits
    in the queue for a later request.
    """

    def __init__(self, assoc: Association) -> None:
        self.dimse = assoc.dimse
        self.get_msg = assoc.dimse.get_msg
        self.kept = 0

    def install(self) -> None:
        self.dimse.get_msg = self  # type: ignore[method-assign]  # this association's provider only

    def __call__(self, block: bool = False) -> Any:
        context_id, msg = self.get_msg(block=block)
        if not block and msg is not None and not msg.is_valid_request:
            self.dimse.msg_queue.put((context_id, msg))  # type: ignore[arg-type]  # as get_msg took it off
            self.kept += 1
            return None, None
        return context_id, msg


def _set_nodelay(assoc: Association) -> bool:
    return set_nodelay(assoc.dul.socket.socket if assoc.dul.socket else None)


def deliver(
    files: Sequence[Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout: float = 30.0,
) -> DeliveryResult:
    """C-STORE every file to ``destination`` over one association; never raises for network problems."""
    started = time.monotonic()
    result = DeliveryResult(destination=destination.label)
    items = [_inspect(Path(f), i) for i, f in enumerate(files)]
    slots: list[InstanceOutcome | None] = [None] * len(items)  # outcomes in the order of ``files``
    for it in items:
        if it.error:
            slots[it.index] = InstanceOutcome(it.sop_instance, None, False, False, it.error)
    sendable = [it for it in items if not it.error]
    if not sendable:
        _finish(result, slots, destination, calling_ae_title, started, None, False)
        return result

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in _contexts(sendable):
        ae.add_requested_context(sop_class, syntaxes)

    state: dict[str, Any] = {"nodelay": False, "reject": None, "connected": False}

    def on_open(event: evt.Event) -> None:
        state["connected"] = True
        state["nodelay"] = _set_nodelay(event.assoc)

    def on_acse_recv(event: evt.Event) -> None:
        p = getattr(event, "primitive", None)
        if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02):
            state["reject"] = f"{p.result_str}, {p.source_str}: {p.reason_str}"

    tls_args = None
    if destination.tls is not None:
        try:
            tls_args = (client_context(destination.tls), destination.host)
        except (OSError, ssl.SSLError) as exc:
            result.error = f"TLS configuration error: {exc}"
            _fail_all(slots, sendable, False, result.error)
            _finish(result, slots, destination, calling_ae_title, started, None, False)
            return result

    assoc_started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse_recv)],
        )
    except Exception as exc:  # noqa: BLE001 - e.g. name resolution inside pynetdicom
        result.error = f"association failed: {exc}".replace("\n", " ")
        _fail_all(slots, sendable, True, result.error)
        _finish(result, slots, destination, calling_ae_title, started, None, False)
        ae.shutdown()
        return result
    assoc_s = time.monotonic() - assoc_started

    try:
        if not assoc.is_established:
            retryable = True
            if not state["connected"]:
                result.error = (f"cannot connect to {destination.host}:{destination.port} "
                                f"(refused, unreachable{', TLS handshake failed' if destination.tls else ''} "
                                f"or no answer within {timeout:g} s)")
            elif assoc.is_rejected:
                result.error = f"association rejected ({state['reject'] or 'no reason given'})"
            elif assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
                result.error = "association aborted: the peer accepted no presentation context (SOP class not supported)"
                retryable = False
            elif assoc.is_aborted:
                result.error = "association aborted during negotiation"
            else:
                result.error = f"no answer to the association request within {timeout:g} s"
            _fail_all(slots, sendable, retryable, result.error)
            return result

        state["nodelay"] = state["nodelay"] or _set_nodelay(assoc)
        guard = _ResponsesToTheSender(assoc)
        guard.install()
        for idx, it in enumerate(sendable):
            if not assoc.is_established:
                detail = "not sent: association " + ("aborted" if assoc.is_aborted else "ended")
                _fail_all(slots, sendable[idx:], True, detail)
                if result.error is None:
                    result.error = (f"association {'aborted' if assoc.is_aborted else 'ended'} midway: "
                                    f"{len(sendable) - idx} of {len(sendable)} instance(s) not sent")
                break
            slots[it.index] = _send_one(assoc, it, msg_id=idx + 1)
        else:
            assoc.release()
        return result
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()
        _finish(result, slots, destination, calling_ae_title, started, assoc_s, state["nodelay"])


def _send_one(assoc: Association, it: _Item, msg_id: int) -> InstanceOutcome:
    try:
        status_ds = assoc.send_c_store(it.path, msg_id=msg_id & 0xFFFF)
    except ValueError as exc:
        # no accepted presentation context for this SOP class / transfer syntax, or not encodable
        return InstanceOutcome(it.sop_instance, None, False, False, f"not sent: {exc}".replace("\n", " "))
    except RuntimeError as exc:  # association went away between checks
        return InstanceOutcome(it.sop_instance, None, False, True, f"not sent: {exc}".replace("\n", " "))
    except (OSError, AttributeError) as exc:
        return InstanceOutcome(it.sop_instance, None, False, False, f"cannot send file: {exc}".replace("\n", " "))
    if "Status" not in status_ds:
        why = "association aborted" if assoc.is_aborted else "DIMSE timeout or connection lost"
        return InstanceOutcome(it.sop_instance, None, False, True, f"no response ({why})")
    status = int(status_ds.Status)
    stored, retryable, text = classify_status(status)
    comment = status_ds.get("ErrorComment")
    if comment:
        text += f" ({comment})"
    return InstanceOutcome(it.sop_instance, status, stored, retryable, text)


def _fail_all(slots: list[InstanceOutcome | None], items: list[_Item], retryable: bool, detail: str) -> None:
    for it in items:
        slots[it.index] = InstanceOutcome(it.sop_instance, None, False, retryable, detail)


def _finish(result: DeliveryResult, slots: list[InstanceOutcome | None], destination: Destination, calling: str,
            started: float, assoc_s: float | None, nodelay: bool) -> None:
    result.outcomes = [o for o in slots if o is not None]
    _log(result, destination, calling, started, assoc_s, nodelay)


def _log(result: DeliveryResult, destination: Destination, calling: str, started: float,
         assoc_s: float | None, nodelay: bool) -> None:
    stored = result.stored_count
    warnings = sum(1 for o in result.outcomes if o.stored and o.status in WARNING_STATUSES)
    failed = len(result.outcomes) - stored
    retryable = sum(1 for o in result.outcomes if not o.stored and o.retryable)
    total = time.monotonic() - started
    level = logging.INFO if result.ok else logging.WARNING
    logger.log(
        level,
        "c-store destination=%s calling=%s called=%s host=%s:%d tls=%s tcp_nodelay=%d instances=%d "
        "stored=%d warnings=%d failed=%d retryable=%d associate_s=%s total_s=%.3f%s",
        destination.label, calling, destination.ae_title, destination.host, destination.port,
        "on" if destination.tls else "off", int(nodelay), len(result.outcomes), stored, warnings, failed,
        retryable, "-" if assoc_s is None else f"{assoc_s:.3f}", total,
        f" error={result.error}" if result.error else "",
    )
