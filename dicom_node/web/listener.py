"""The HTTP listener: waitress serving one WSGI application from a thread of ``serve``.

Waitress reads every request whole on one event-loop thread (no thread per
connection) and hands only complete requests to a small, fixed pool of
threads, so a peer that connects and sends slowly, or not at all, holds no
thread.  The limits below bound what unauthenticated peers can hold: open
connections, idle time, header and body sizes (bodies above 512 KB would be
buffered to a temporary file by waitress; none of today's routes takes a body).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

from waitress import wasyncore
from waitress.server import create_server

__all__ = ["HttpListener", "ListenError", "LIMITS", "check_http_address"]

log = logging.getLogger(__name__)

#: waitress adjustments (see waitress' documentation for each)
LIMITS: dict[str, Any] = {
    "threads": 2,  # requests handled at once; more wait in waitress' queue (at most one per connection)
    "connection_limit": 32,  # open connections; past it waitress stops accepting until one closes
    "channel_timeout": 15,  # seconds a connection may stay idle (no request in progress) before it is closed
    "cleanup_interval": 5,  # how often idle connections are looked for (seconds)
    "max_request_header_size": 16 * 1024,  # bytes; a bigger header is answered 431
    "max_request_body_size": 64 * 1024,  # bytes; a bigger body is answered 413
    "backlog": 64,
    "expose_tracebacks": False,
    "clear_untrusted_proxy_headers": True,
    "ident": "dicomnode",
}

#: how long the loop waits for socket events before it looks whether it should stop (seconds)
_POLL_SECONDS = 0.2
#: requests in progress at shutdown get this long to finish (seconds)
_SHUTDOWN_GRACE = 3

WSGIApp = Callable[..., Any]


class ListenError(OSError):
    """The HTTP listener cannot listen where it is told to; ``str()`` is one line naming the address."""


def _listen_error(exc: OSError, host: str, port: int) -> ListenError:
    return ListenError(f"{exc.strerror or exc} (http.host:http.port = {host}:{port})")


def check_http_address(host: str, port: int) -> None:
    """Raise :class:`ListenError` (e.g. address in use) before anything is created on disk."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _listen_error(exc, host, port) from None
    family, _type, _proto, _name, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress does: TIME_WAIT is no obstacle
        try:
            s.bind(addr)
            s.listen(1)
        except OSError as exc:
            raise _listen_error(exc, host, port) from None


class HttpListener:
    """``start()`` serves *app* on *host*:*port* from a daemon thread; ``stop()`` closes every connection."""

    def __init__(self, app: WSGIApp, host: str, port: int) -> None:
        self._map: dict[int, Any] = {}  # our own socket map: nothing shared with other asyncore users
        try:
            self.server = create_server(app, map=self._map, host=host, port=port, **LIMITS)
        except OSError as exc:
            raise _listen_error(exc, host, port) from None
        self.host, self.port = str(self.server.effective_host), int(self.server.effective_port)  # type: ignore[union-attr]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self) -> "HttpListener":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._map:
                wasyncore.loop(timeout=_POLL_SECONDS, map=self._map, use_poll=True, count=1)
        except Exception:
            log.exception("the HTTP listener failed")
        finally:
            self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=_SHUTDOWN_GRACE)
            wasyncore.close_all(self._map)

    def stop(self, timeout: float = _SHUTDOWN_GRACE + 2.0) -> None:
        """Stop listening and close every connection (requests in progress get a few seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the HTTP listener did not stop in %.0f s", timeout)
        elif not self._thread.ident:  # never started: close the listening socket here
            wasyncore.close_all(self._map)
