"""The Storage SCP: the one place that builds the AE and wires its handlers.

Handlers stay thin: C-STORE hands the received file to :class:`Intake` and
returns its status; association events only keep counters and log one line
per association.  No inference ever runs on an association thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pydicom.uid import UID

from dicom_node import incoming
from dicom_node.config import Config
from dicom_node.intake import Intake
from dicom_node.net.slots import AssociationSlots, Slot
from dicom_node.net.tls import server_context, set_nodelay
from dicom_node.net.transport import GuardedServer, Limits
from storage.ledger import Ledger
from vocab.dimse import StoreStatus

log = logging.getLogger(__name__)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (MR, Enhanced MR, SR, SC, CT, ...)."""
    from pynetdicom import AllStoragePresentationContexts

    return sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts})


class ReceiveObserver(Protocol):
    """Told about every association and instance this SCP handles (``/metrics`` counts them)."""

    def association_accepted(self) -> None: ...

    def association_rejected(self, reason: str) -> None: ...  # one of REJECTION_CODES' values, or "other"

    def instance_received(self, outcome: str, nbytes: int) -> None: ...  # "stored", "duplicate" or "rejected"


class _Unobserved:
    def association_accepted(self) -> None:
        pass

    def association_rejected(self, reason: str) -> None:
        pass

    def instance_received(self, outcome: str, nbytes: int) -> None:
        pass


class SeriesCarriers(Protocol):
    """Told which series associations carry, across every receiving process: a series whose last carrying
    association was released is complete soon after (``series.complete_on_release``)."""

    def carrying(self, series_uid: str) -> None: ...  # an association stored its first instance of this series

    def dropped(self, series_uids: list[str], released: bool) -> None: ...  # an association carrying them ended


class LedgerCarriers:
    """Counts the associations carrying each series; records a release in the ledger when the last one of a
    series ended with A-RELEASE (an aborted association completes nothing: the series waits for quiet_seconds)."""

    def __init__(self, ledger: Ledger, complete_on_release: bool) -> None:
        self.ledger = ledger
        self.complete_on_release = complete_on_release
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    def carrying(self, series_uid: str) -> None:
        with self._lock:
            self._count[series_uid] += 1

    def dropped(self, series_uids: list[str], released: bool) -> None:
        done = []
        with self._lock:
            for uid in series_uids:
                self._count[uid] -= 1
                if self._count[uid] <= 0:
                    del self._count[uid]
                    done.append(uid)
        if released and self.complete_on_release and done:
            try:
                self.ledger.mark_released(done)
            except Exception:
                log.exception("could not record association release")


@dataclass
class _AssocStats:
    calling_aet: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    duplicates: int = 0
    bytes: int = 0
    series: Counter[str] = field(default_factory=Counter)
    outcome: str = "closed"


class AssociationTracker:
    """Counts per association; knows which series active associations carry."""

    def __init__(self, carriers: SeriesCarriers, observer: ReceiveObserver | None = None) -> None:
        self.carriers = carriers
        self.observer: ReceiveObserver = observer or _Unobserved()
        self._lock = threading.Lock()
        self._stats: dict[int, _AssocStats] = {}

    def opened(self, event: evt.Event) -> None:
        set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)

    def accepted(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats(rq.ae_title, f"{rq.address}:{rq.port}")
        self.observer.association_accepted()

    def stored(self, event: evt.Event, series_uid: str | None, ok: bool, duplicate: bool, nbytes: int) -> None:
        self.observer.instance_received("rejected" if not ok else "duplicate" if duplicate else "stored", nbytes)
        first = False
        with self._lock:
            st = self._stats.get(id(event.assoc))
            if st is None:
                return
            if ok:
                st.stored += 1
                st.duplicates += duplicate
                st.bytes += nbytes
                if series_uid:
                    first = series_uid not in st.series
                    st.series[series_uid] += 1
            else:
                st.failed += 1
        if first and series_uid:
            self.carriers.carrying(series_uid)

    def ended(self, event: evt.Event, outcome: str) -> None:
        with self._lock:
            st = self._stats.get(id(event.assoc))
            if st is not None:
                st.outcome = outcome

    def closed(self, event: evt.Event) -> None:
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
            if st is None:
                return
        secs = time.monotonic() - st.started
        if st.series:
            self.carriers.dropped(list(st.series), st.outcome == "released")
        log.info(
            "association from %s (%s) %s after %.2f s: %d stored (%d resent), %d failed, %.1f MB, %d series%s",
            st.calling_aet, st.peer, st.outcome, secs, st.stored, st.duplicates, st.failed, st.bytes / 1e6,
            len(st.series), (": " + ", ".join(f"{u} ({n})" for u, n in st.series.items())) if st.series else "",
        )


class Admission:
    """At most ``node.max_associations`` associations past their A-ASSOCIATE-RQ at a time, across every
    receiving process (each admitted association holds one of the shared :class:`AssociationSlots`).

    pynetdicom 3.0 counts every acceptor thread against
    ``AE.maximum_associations``, including connections that have not sent
    their association request yet, so ten silent peers lock every sender out
    until their ACSE timeout.  Here only requested associations count; the AE's
    own limit is raised above this one (see :func:`build_ae`) and connections
    still waiting are bounded by the transport (``Limits.max_pending``).
    """

    def __init__(self, slots: AssociationSlots) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._held: dict[int, tuple[weakref.ref[Any], Slot]] = {}

    def requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._sweep()
        slot = self.slots.acquire()
        if slot is not None:
            with self._lock:
                self._held[id(assoc)] = (weakref.ref(assoc), slot)
            return
        # transient, service provider (presentation), local limit exceeded: what pynetdicom's own limit answers,
        # and, as pynetdicom does after its own rejections, EVT_REJECTED: the rejection handler logs and records it
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # waits for the A-ASSOCIATE-RJ to go out and the peer to close (or the ARTIM timer)

    def closed(self, event: evt.Event) -> None:
        with self._lock:
            held = self._held.pop(id(event.assoc), None)
        if held is not None:
            held[1].release()

    def _sweep(self) -> None:
        """Free the slots of associations that ended without EVT_CONN_CLOSE (a thread that died)."""
        with self._lock:
            gone = [k for k, (ref, _) in self._held.items() if (a := ref()) is None or not a.is_alive()]
            slots = [self._held.pop(k)[1] for k in gone]
        for slot in slots:
            slot.release()


def make_store_handler(intake: Intake, tracker: AssociationTracker) -> Callable[[evt.Event], int]:
    def handle_store(event: evt.Event) -> int:
        req = event.request
        assert isinstance(req, C_STORE)
        result = intake.store(
            Path(event.dataset_path),
            calling_aet=event.assoc.requestor.ae_title,
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
        )
        ok = result.status is StoreStatus.SUCCESS
        tracker.stored(event, result.series_uid, ok, result.duplicate, result.size_bytes)
        return int(result.status)

    return handle_store


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def build_ae(cfg: Config) -> AE:
    ae = AE(ae_title=cfg.node.ae_title)
    # Admission enforces node.max_associations on requested associations; pynetdicom's own count
    # (every acceptor thread, waiting connections included) is only a backstop above it
    ae.maximum_associations = cfg.node.max_associations + pending_limit(cfg)
    ae.maximum_pdu_size = cfg.node.max_pdu
    ae.acse_timeout = cfg.node.acse_timeout
    ae.dimse_timeout = cfg.node.dimse_timeout
    ae.network_timeout = cfg.node.network_timeout
    ae.require_called_aet = True
    ae.require_calling_aet = [] if cfg.security.allow_any_calling_aet else list(cfg.security.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def connection_limits(cfg: Config, receivers: int = 1) -> Limits:
    """Deadlines and caps for every connection of one of *receivers* receiving processes (each gets its share of
    the connections that may wait for their association request; see :mod:`dicom_node.net.transport`)."""
    n = cfg.node
    return Limits(acse_timeout=n.acse_timeout, network_timeout=n.network_timeout, max_pdu=n.max_pdu,
                  max_pending=max(4, -(-pending_limit(cfg) // receivers)))


def pending_limit(cfg: Config) -> int:
    """Connections that may wait for their association request, all receiving processes together."""
    return max(16, 4 * cfg.node.max_associations)


def start_scp(cfg: Config, ledger: Ledger, intake: Intake, observer: ReceiveObserver | None = None, *,
              slots: AssociationSlots, carriers: SeriesCarriers | None = None, receivers: int = 1,
              listen_socket: socket.socket | None = None) -> GuardedServer:
    """Start the SCP in the background and return its server (``.shutdown()`` to stop).

    *observer* is told of every association and instance (see :class:`ReceiveObserver`), *carriers* of the
    series associations carry (default: this process's own :class:`LedgerCarriers`).  *slots* bound the
    associations of every receiving process of this ``serve``.  With *receivers* > 1 the listening socket is
    shared by that many processes: ``serve``'s own, or *listen_socket* (``serve``'s, inherited) in the others."""
    # Stream each received data set straight into the spool's incoming folder
    # (same file system as its final place, so it is renamed, not copied).
    _config.STORE_RECV_CHUNKED_DATASET = True
    incoming.install(intake.spool.incoming)  # a full disk is answered 0xA700, not an abort
    _config.LOG_HANDLER_LEVEL = "none"

    ae = build_ae(cfg)
    tracker = AssociationTracker(carriers or LedgerCarriers(ledger, cfg.series.complete_on_release), observer)
    admission = Admission(slots)
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, tracker.opened),
        (evt.EVT_REQUESTED, admission.requested),
        (evt.EVT_ACCEPTED, tracker.accepted),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, make_store_handler(intake, tracker)),
        (evt.EVT_RELEASED, lambda e: tracker.ended(e, "released")),
        (evt.EVT_ABORTED, lambda e: tracker.ended(e, "aborted")),
        (evt.EVT_REJECTED, make_rejection_handler(cfg, ledger, tracker.observer)),
        (evt.EVT_CONN_CLOSE, tracker.closed),
        (evt.EVT_CONN_CLOSE, admission.closed),
    ]
    ssl_ctx = server_context(cfg.security.tls) if cfg.security.tls else None
    server = ae.make_server((cfg.node.host, cfg.node.port), evt_handlers=handlers, ssl_context=ssl_ctx,
                            server_class=GuardedServer, limits=connection_limits(cfg, receivers),
                            listen_socket=listen_socket, shared=receivers > 1)
    assert isinstance(server, GuardedServer)
    server.start()
    return server


def stop_receiving(server: GuardedServer, grace: float) -> None:
    """Stop the SCP within *grace* + about 3 s, whatever peers do.

    New connections stop at once, and so do connections that have not yet
    sent their association request.  Established associations get *grace*
    seconds to finish; then they are aborted and every connection is cut (a
    peer stalled mid-PDU cannot hold us).
    """
    server.shutdown()
    server.close_connections(unassociated_only=True)

    def established() -> list[Any]:
        return [a for a in server.active_associations if a.is_established]

    deadline = time.monotonic() + grace
    while established() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = established()
    if left:
        log.warning("%d association(s) still open at shutdown; aborting them", len(left))
        for a in left:
            a.abort(block=False)  # the A-ABORT goes out unless the reactor is blocked on a stalled peer
        time.sleep(0.5)
    server.close_connections()
    deadline = time.monotonic() + 2.0
    while established() and time.monotonic() < deadline:  # let the reactors see it (and fire their events)
        time.sleep(0.05)


#: (result, source, diagnostic) of an A-ASSOCIATE-RJ we send -> the short reason ``/metrics`` labels it with
REJECTION_CODES: dict[tuple[int, int, int], str] = {
    (0x01, 0x01, 0x03): "calling_aet_not_allowed",
    (0x01, 0x01, 0x07): "called_aet_not_ours",
    (0x02, 0x03, 0x02): "association_limit",
}


def rejection_code(result: int | None, source: int | None, diagnostic: int | None) -> str:
    if result is None or source is None or diagnostic is None:
        return "other"
    return REJECTION_CODES.get((result, source, diagnostic), "other")


def rejection_reason(cfg: Config, result: int | None, source: int | None, diagnostic: int | None,
                     fallback: str) -> str:
    """The operator's words for an A-ASSOCIATE-RJ we sent."""
    if (result, source, diagnostic) == (0x01, 0x01, 0x03):
        return "calling AE title not allowed (security.allowed_calling_aets)"
    if (result, source, diagnostic) == (0x01, 0x01, 0x07):
        return f"called AE title is not ours (node.ae_title = {cfg.node.ae_title})"
    if (result, source, diagnostic) == (0x02, 0x03, 0x02):
        return f"association limit reached (node.max_associations = {cfg.node.max_associations})"
    return fallback or "no reason given"


def make_rejection_handler(cfg: Config, ledger: Ledger,
                           observer: ReceiveObserver | None = None) -> Callable[[evt.Event], None]:
    """Log and record every association we reject: called AE, calling AE, peer and why."""
    seen: ReceiveObserver = observer or _Unobserved()

    def on_rejected(event: evt.Event) -> None:
        rq = event.assoc.requestor
        req = getattr(rq, "primitive", None)  # the A-ASSOCIATE request
        rj = getattr(event.assoc.acceptor, "primitive", None)  # the A-ASSOCIATE-RJ we answered
        calling = str(getattr(req, "calling_ae_title", None) or rq.ae_title or "").strip()
        called = str(getattr(req, "called_ae_title", None) or "").strip()
        peer = f"{rq.address}:{rq.port}"
        result = {0x01: "rejected (permanent)", 0x02: "rejected (transient)"}.get(int(getattr(rj, "result", 0) or 0),
                                                                                  "rejected")
        reason = rejection_reason(cfg, getattr(rj, "result", None), getattr(rj, "result_source", None),
                                  getattr(rj, "diagnostic", None), str(getattr(rj, "reason_str", "") or ""))
        log.warning("association rejected: called AE %r, calling AE %r, peer %s: %s, %s",
                    called, calling, peer, result, reason)
        seen.association_rejected(rejection_code(getattr(rj, "result", None), getattr(rj, "result_source", None),
                                                 getattr(rj, "diagnostic", None)))
        try:
            ledger.record_association_rejection(calling_aet=calling, called_aet=called, peer=peer, result=result,
                                                reason=reason)
        except Exception:
            log.exception("could not record the association rejection")

    return on_rejected
