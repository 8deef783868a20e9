"""The SCP's connections: accepting, TLS handshakes, and reading PDUs under a deadline and a size cap.

Works around pynetdicom 3.0.x (``transport.AssociationServer``,
``transport.AssociationSocket``, ``dul.DULServiceProvider``), which

* wraps TLS inside the accept loop on a blocking socket, so one peer that
  connects and stays silent stops every TLS association;
* reads each PDU with blocking ``recv`` calls without a deadline (its ARTIM
  and idle timers are only looked at between PDUs), so a peer that sends part
  of a PDU holds its association slot and thread for ever;
* buffers whatever length a PDU header declares (up to 4 GiB), before any
  association is negotiated and whatever ``maximum_pdu_size`` we advertised;
* logs several lines without the peer for junk (e.g. an HTTP request) and
  then waits for bytes that never come.

The fix sits below pynetdicom, through the hooks it and the standard library
document: :class:`GuardedServer` is the ``server_class`` for
``AE.make_server``; its ``get_request`` hands pynetdicom sockets of our own
class (:class:`GuardedSocket`, or :class:`GuardedSSLSocket` through
``SSLContext.sslsocket_class``) whose ``recv`` reads one whole PDU at a time,
under a deadline and a size cap, before pynetdicom sees any of it; the TLS
handshake runs in the connection's own thread (:class:`GuardedHandler`).
A PDU that breaks the rules gets one log line naming the peer, an A-ABORT
where the protocol asks for one, and its connection closed; pynetdicom then
sees a closed connection and cleans up as usual, without logging.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pynetdicom import pdu as pdus
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: Cap on every PDU before the association is established and on every PDU other than
#: P-DATA-TF.  The standard does not bound an A-ASSOCIATE-RQ by max_pdu; a real one is a
#: few KiB (128 presentation contexts of 10 transfer syntaxes each are about 30 KiB).
ASSOCIATION_PDU_CAP = 64 * 1024
#: P-DATA-TF may exceed the max_pdu we advertise by this much (senders that count the
#: PDU header or PDV item headers into the limit).
PDATA_SLACK = 256
_PDU_TYPES = range(0x01, 0x08)
#: PDUs other than P-DATA-TF are decoded here first, so that a malformed one gets our single log
#: line instead of pynetdicom's error and traceback (P-DATA-TF, the bulk, is left to pynetdicom)
_DECODERS: dict[int, type] = {0x01: pdus.A_ASSOCIATE_RQ, 0x02: pdus.A_ASSOCIATE_AC, 0x03: pdus.A_ASSOCIATE_RJ,
                              0x05: pdus.A_RELEASE_RQ, 0x06: pdus.A_RELEASE_RP, 0x07: pdus.A_ABORT_RQ}
_P_DATA_TF = 0x04
# A-ABORT reasons (PS3.8 Table 9-26) with source 2 = service provider
_UNRECOGNISED_PDU, _INVALID_PARAMETER, _NOT_SPECIFIED = 0x01, 0x06, 0x00


@dataclass(frozen=True)
class Limits:
    """What a connection may do.  A timeout of 0 or None means no deadline."""

    acse_timeout: float | None  # TLS handshake + the first PDU (A-ASSOCIATE-RQ), from accept
    network_timeout: float | None  # every later PDU, from its first byte; also bounds every send
    max_pdu: int  # largest P-DATA-TF variable field we advertise; 0 = no limit advertised
    max_pending: int  # connections not yet past their first PDU; more are closed at once

    @property
    def pdata_cap(self) -> int:
        return self.max_pdu + PDATA_SLACK if self.max_pdu > 0 else 0xFFFFFFFF


def _seconds(t: float | None) -> float | None:
    return t if t else None


class _Refused(Exception):
    """A PDU broke a rule: the connection is closed (``abort``: with an A-ABORT PDU first)."""

    def __init__(self, reason: str, abort: int | None = None) -> None:
        super().__init__(reason)
        self.abort = abort


class _Cut(_Refused):
    """We closed the connection ourselves (shutdown): nothing to log."""


class _PduGuard:
    """Mixin for socket classes: ``recv`` returns bytes of whole PDUs that passed the checks.

    pynetdicom reads a PDU as ``recv(6)`` (the header) and then ``recv`` of
    its length.  At the start of each PDU this reads the whole PDU, under its
    deadline and cap, into a buffer that the following calls drain; on a
    violation it returns ``b""``, which pynetdicom takes for a closed
    connection.  Only pynetdicom's reactor thread reads, so no lock is needed.
    """

    _limits: Limits
    _peer: str = "?"
    _first_deadline: float | None = None
    _buf: memoryview | None = None
    _timeout: float | None = None  # what settimeout was last given
    _pos: int = 0
    _dead: bool = False
    pdus_read: int = 0  # complete PDUs read; 0 = not yet past the A-ASSOCIATE-RQ

    def guard(self, limits: Limits, peer: str) -> None:
        self._limits = limits
        self._peer = peer
        acse = _seconds(limits.acse_timeout)
        self._first_deadline = time.monotonic() + acse if acse else None
        self._set_timeout(_seconds(limits.network_timeout))  # bounds sends too

    @property
    def handshake_deadline(self) -> float | None:
        return self._first_deadline

    def recv(self, bufsize: int, flags: int = 0) -> memoryview | bytes:
        """Up to *bufsize* bytes of the current PDU, without copying (pynetdicom extends a bytearray with them)."""
        buf = self._buf
        if buf is None:
            if self._dead or not self._read_pdu():
                return b""
            buf = self._buf
            assert buf is not None
        pos = self._pos
        chunk = buf[pos:pos + bufsize]
        pos += len(chunk)
        if pos >= len(buf):
            self._buf, self._pos = None, 0
        else:
            self._pos = pos
        return chunk

    def _read_pdu(self) -> bool:
        first = self.pdus_read == 0
        if first:
            deadline = self._first_deadline
        else:
            net = _seconds(self._limits.network_timeout)
            deadline = time.monotonic() + net if net else None
        head = bytearray(6)
        try:
            if not self._fill(memoryview(head), deadline, at_boundary=True):
                self._dead = True  # the peer closed between PDUs: normal
                return False
            pdu_type, _, length = struct.unpack(">BBL", head)
            if pdu_type not in _PDU_TYPES:
                raise _Refused(f"not a DICOM PDU (starts {bytes(head)!r})", _UNRECOGNISED_PDU)
            cap = ASSOCIATION_PDU_CAP if first or pdu_type != _P_DATA_TF else self._limits.pdata_cap
            if length > cap:
                raise _Refused(f"PDU type 0x{pdu_type:02X} declares {length} bytes, at most {cap} allowed"
                               f"{' before association' if first else ''}", _INVALID_PARAMETER)
            pdu = bytearray(6 + length)
            pdu[:6] = head
            if not self._fill(memoryview(pdu)[6:], deadline, at_boundary=False):
                raise _Refused(f"connection closed mid-PDU (type 0x{pdu_type:02X}, {length} bytes)")
            decoder = _DECODERS.get(pdu_type)
            if decoder is not None:
                try:
                    decoder().decode(bytes(pdu))
                except Exception as exc:
                    raise _Refused(f"malformed {decoder.__name__} PDU ({type(exc).__name__}: {exc})"[:300],
                                   _INVALID_PARAMETER) from None
        except _Cut:
            return False
        except _Refused as exc:
            self._refuse(exc)
            return False
        self.pdus_read += 1
        self._buf, self._pos = memoryview(pdu), 0  # a fresh buffer per PDU: the slices handed out stay valid
        return True

    def _fill(self, view: memoryview, deadline: float | None, at_boundary: bool) -> bool:
        """Fill *view* from the socket by *deadline*; False if the peer closed before the first byte."""
        got = 0
        while got < len(view):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Refused(self._late(got, len(view), at_boundary), _NOT_SPECIFIED)
                if self._timeout is None or abs(left - self._timeout) > 0.25:  # syscalls: not for every chunk
                    self._set_timeout(left)
            try:
                n = super().recv_into(view[got:])  # type: ignore[misc]
            except TimeoutError:
                raise _Refused(self._late(got, len(view), at_boundary), _NOT_SPECIFIED) from None
            except (OSError, ValueError) as exc:  # reset, TLS error, or closed under us at shutdown
                if self._dead:
                    raise _Cut("closed locally") from None
                if at_boundary and got == 0:
                    return False
                raise _Refused(f"connection failed mid-PDU: {exc}") from None
            if n == 0 and self._dead:
                raise _Cut("closed locally")
            if n == 0:
                if at_boundary and got == 0:
                    return False
                raise _Refused(f"connection closed mid-PDU ({got} of {len(view)} bytes)")
            got += n
        return True

    def _set_timeout(self, t: float | None) -> None:
        self._timeout = t
        self.settimeout(t)  # type: ignore[attr-defined]

    def _late(self, got: int, want: int, header: bool) -> str:
        what = "association request" if self.pdus_read == 0 else "PDU"
        t = self._limits.acse_timeout if self.pdus_read == 0 else self._limits.network_timeout
        part = "header" if header else "body"
        return f"no complete {what} within {t:g} s ({got} of {want} {part} bytes)"

    def _refuse(self, exc: _Refused) -> None:
        log.warning("closed connection from %s: %s", self._peer, exc)
        if exc.abort is not None:
            try:
                self.settimeout(1.0)  # type: ignore[attr-defined]
                self.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, exc.abort))  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass
        self.hard_close()

    def hard_close(self) -> None:
        """Shut the connection down now (any thread); a blocked read returns at once."""
        self._dead = True
        try:
            socket.socket.shutdown(self, socket.SHUT_RDWR)  # type: ignore[arg-type]
        except (OSError, ValueError):
            pass


class GuardedSocket(_PduGuard, socket.socket):  # type: ignore[misc]  # recv returns a memoryview
    """A plain TCP connection whose reads are whole, checked PDUs."""


class GuardedSSLSocket(_PduGuard, ssl.SSLSocket):  # type: ignore[misc]
    """A TLS connection whose reads are whole, checked PDUs (via ``SSLContext.sslsocket_class``)."""


class GuardedHandler(RequestHandler):
    """Runs in the connection's own thread: the TLS handshake (under the ACSE deadline), then pynetdicom."""

    def handle(self) -> None:
        sock = self.request
        if isinstance(sock, GuardedSSLSocket):
            deadline = sock.handshake_deadline
            try:
                if deadline is not None:
                    sock._set_timeout(max(0.001, deadline - time.monotonic()))
                sock.do_handshake()
            except (OSError, ValueError) as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                log.warning("closed connection from %s: TLS handshake failed: %s", _addr(self.client_address), why)
                sock.hard_close()
                self.server.shutdown_request(sock)
                return
        super().handle()


def _addr(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with guarded connections (pass as ``server_class`` to ``AE.make_server``).

    Start it with :meth:`start` and stop with :meth:`shutdown`; :meth:`close_connections`
    cuts open connections (used at shutdown so that no peer can hold ``serve`` up).
    """

    daemon_threads = True  # a connection thread never keeps the process alive
    request_queue_size = 64  # listen backlog (socketserver: 5): parallel senders connecting at once are not dropped

    def __init__(self, *args: Any, limits: Limits, listen_socket: socket.socket | None = None, shared: bool = False,
                 **kwargs: Any) -> None:
        self.limits = limits
        self._inherited = listen_socket
        self.shared = shared or listen_socket is not None
        self._conns: weakref.WeakSet[_PduGuard] = weakref.WeakSet()
        self._conns_lock = threading.Lock()
        kwargs.setdefault("request_handler", GuardedHandler)
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = GuardedSSLSocket  # documented SSLContext attribute
        if self.shared:
            # several processes accept from this socket: the one that loses a race for a connection gets EAGAIN
            # at once (with a timeout Python would wait on for the next connection); the one that wins is the
            # one whose acceptor thread ran first, i.e. a process with time to spare
            assert self.socket is not None
            self.socket.settimeout(0)
        self._thread: threading.Thread | None = None

    def server_bind(self) -> None:
        """Bind, or take over *listen_socket* (already bound and listening: another process's, inherited)."""
        if self._inherited is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the fresh one socketserver made
        self.socket = self._inherited
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._inherited is None:
            super().server_activate()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="AcceptorServer", daemon=True)
        self._thread.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        raw, address = self.socket.accept()
        peer = _addr(address)
        if self.ssl_context is not None:
            # no handshake here: it runs in the connection's thread (GuardedHandler)
            sock: Any = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        else:
            sock = GuardedSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.guard(self.limits, peer)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Waiting connections are bounded by their sockets and by pynetdicom's acceptor threads that
        # have no association (a closed connection's thread waits out acse_timeout in pynetdicom 3.0).
        with self._conns_lock:
            sockets = len([c for c in self._conns
                           if c.pdus_read == 0 and not c._dead and c.fileno() != -1])  # type: ignore[attr-defined]
            threads = len([a for a in self.active_associations if not a.is_established])
            pending = max(sockets, threads)
            if pending >= self.limits.max_pending:
                log.warning("closed connection from %s: %d connections already wait for their association "
                            "request", _addr(client_address), pending)
                return False
            self._conns.add(request)
        return True

    def close_connections(self, unassociated_only: bool = False) -> int:
        """Cut connections (only those not yet past their A-ASSOCIATE-RQ if *unassociated_only*)."""
        with self._conns_lock:
            conns = [c for c in self._conns if not c._dead and not (unassociated_only and c.pdus_read)]
        for c in conns:
            c.hard_close()
        return len(conns)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (established associations carry on)."""
        socketserver.BaseServer.shutdown(self)  # the AE never listed this server (AE.make_server)
        self.server_close()
