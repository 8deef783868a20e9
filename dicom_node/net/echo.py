"""C-ECHO a destination: is it there, does it accept our AE titles, and how long does it take?"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from dicom_node.config import Destination
from dicom_node.net.tls import client_context

__all__ = ["EchoResult", "echo"]


@dataclass(frozen=True)
class EchoResult:
    destination: Destination
    ok: bool
    answer: str  # what the peer said, or why there was no answer
    seconds: float


def echo(destination: Destination, *, calling_ae_title: str, timeout: float = 10.0) -> EchoResult:
    """One association, one C-ECHO; never raises for network problems."""
    started = time.monotonic()
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    state: dict[str, Any] = {"connected": False, "reject": None}

    def on_open(_event: evt.Event) -> None:
        state["connected"] = True

    def on_acse_recv(event: evt.Event) -> None:
        p = getattr(event, "primitive", None)
        if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02):
            state["reject"] = f"{p.result_str}, {p.source_str}: {p.reason_str}"

    def done(ok: bool, answer: str) -> EchoResult:
        return EchoResult(destination, ok, answer, time.monotonic() - started)

    try:
        tls_args = (client_context(destination.tls), destination.host) if destination.tls else None
    except (OSError, ssl.SSLError) as exc:
        return done(False, f"TLS configuration error: {exc}")
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse_recv)])
    except Exception as exc:  # noqa: BLE001 - e.g. name resolution inside pynetdicom
        ae.shutdown()
        return done(False, f"association failed: {exc}".replace("\n", " "))
    try:
        if not assoc.is_established:
            if not state["connected"]:
                return done(False, f"cannot connect (refused, unreachable or no answer within {timeout:g} s)")
            if assoc.is_rejected:
                return done(False, f"association rejected ({state['reject'] or 'no reason given'})")
            if assoc.is_aborted:
                return done(False, "association aborted (the peer may not support Verification)")
            return done(False, f"no answer to the association request within {timeout:g} s")
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            return done(False, "no C-ECHO response (DIMSE timeout or connection lost)")
        status = int(rsp.Status)
        assoc.release()
        return done(status == 0x0000, f"C-ECHO status 0x{status:04X}" + (" (success)" if status == 0 else ""))
    finally:
        if assoc.is_established:
            assoc.abort()
        ae.shutdown()
