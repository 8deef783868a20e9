"""``[node] receivers = N``: N processes receive on one port, so parallel associations use several cores.

``serve`` itself is receiver 0; :class:`Receivers` keeps receivers 1..N-1 alive.  Each is its own
pynetdicom AE accepting from ``serve``'s listening socket (inherited), writing through the same intake contract
into the same spool and ledger, so durability is the same whichever process answers.  A connection goes to
whichever process accepts it first, which is one with time to spare.  (One socket per process with
``SO_REUSEPORT`` spreads connections by a hash of their addresses instead, blind to load: four long associations
often landed three on one process, and the other core idled; and a connection queued on the socket of a
receiver that dies is reset, where on the shared socket another process takes it.)  The limits are the
node's, not each process's: associations hold the shared :class:`~dicom_node.net.slots.AssociationSlots` and
the connections that may wait for their request are divided between the processes.

What only a receiving process sees travels to ``serve`` over one queue per receiver: the counters of
``/metrics`` (:class:`~dicom_node.net.scp.ReceiveObserver`) and which series its associations carry
(:class:`~dicom_node.net.scp.SeriesCarriers`), so a series still arriving through another process is not
completed by the release of one association, and ``/metrics`` counts every receiver.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.children import watch_parent
from dicom_node.config import Config
from dicom_node.net.scp import ReceiveObserver, SeriesCarriers
from dicom_node.net.slots import AssociationSlots

__all__ = ["ReceiverState", "Receivers", "receiver_main"]

log = logging.getLogger(__name__)

#: seconds between the parent's looks at a receiver's queue (also how soon a relay notices its end)
_POLL_S = 0.5
#: seconds ``serve`` waits at start for its receivers to listen
_START_TIMEOUT_S = 60.0


class _Relay:
    """A receiver's observer and series carriers: every event goes to ``serve`` over *events*."""

    def __init__(self, events: Any) -> None:
        self.events = events

    def association_accepted(self) -> None:
        self.events.put(("accepted",))

    def association_rejected(self, reason: str) -> None:
        self.events.put(("rejected", reason))

    def instance_received(self, outcome: str, nbytes: int) -> None:
        self.events.put(("instance", outcome, nbytes))

    def carrying(self, series_uid: str) -> None:
        self.events.put(("carrying", series_uid))

    def dropped(self, series_uids: list[str], released: bool) -> None:
        self.events.put(("dropped", series_uids, released))


def receiver_main(cfg: Config, index: int, log_level: str, parent_pid: int, events: Any, slots_dir: str,
                  listen_socket: socket.socket) -> None:
    """Entry point of receiving process *index* (>= 1), spawned by ``serve``: accepts from *listen_socket*."""
    from dicom_node.intake import Intake
    from dicom_node.logsetup import configure
    from dicom_node.net.scp import start_scp, stop_receiving
    from storage.ledger import Ledger
    from storage.spool import Spool

    configure(log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: serve decides, and says TERM
    try:
        watch_parent(parent_pid)
    except SystemExit:
        return
    spool = Spool(cfg.spool_dir, cfg.storage.min_free_mb)
    ledger = Ledger(cfg.storage.ledger_url)
    intake = Intake(spool, ledger, overwrite_instances=cfg.storage.overwrite_instances,
                    max_inflated=cfg.node.max_inflated_mb << 20)
    relay = _Relay(events)
    server = start_scp(cfg, ledger, intake, observer=relay, carriers=relay,
                       slots=AssociationSlots(Path(slots_dir), cfg.node.max_associations),
                       receivers=cfg.node.receivers, listen_socket=listen_socket)
    log.info("receiver %d (pid %d) listening on port %d", index, os.getpid(), server.server_address[1])
    events.put(("listening",))
    while not stop.wait(1.0):
        pass
    stop_receiving(server, min(cfg.node.dimse_timeout, 30.0))
    ledger.close()
    events.close()
    events.join_thread()  # every event is in the pipe before the process ends


@dataclass(frozen=True)
class ReceiverState:
    """One receiving process as ``/healthz`` reports it (index 0 is ``serve`` itself)."""

    index: int
    pid: int | None
    alive: bool


class _Child:
    """A receiver process, its event queue, and the thread that hands its events to ``serve``."""

    def __init__(self, proc: mp.process.BaseProcess, events: Any) -> None:
        self.proc = proc
        self.events = events
        self.ended = threading.Event()  # set once the process has exited: the relay drains and ends
        self.listening = threading.Event()  # set when it says it listens
        self.relay: threading.Thread | None = None


class Receivers:
    """The receiving processes of one ``serve``: the association slots they share, and receivers 1..N-1.

    Make it before the SCP (which needs :attr:`slots`), :meth:`start` it with the port the SCP listens on,
    :meth:`supervise` it from the main loop, :meth:`terminate` and :meth:`join` it at shutdown, then
    :meth:`close` it (removes the slot folder).
    """

    def __init__(self, cfg: Config) -> None:
        self.configured = cfg.node.receivers
        self.cfg = cfg
        # a fresh local folder for this serve (flock must not be turned into per-process POSIX locks by NFS)
        self.slots_dir = Path(tempfile.mkdtemp(prefix="dicomnode-associations-"))
        self.slots = AssociationSlots(self.slots_dir, cfg.node.max_associations)
        self.ctx = mp.get_context("spawn")
        self.children: list[_Child] = []
        self.restarts = 0
        self._stopping = False
        self.listen_socket: socket.socket | None = None
        self.observer: ReceiveObserver | None = None
        self.carriers: SeriesCarriers | None = None

    def start(self, listen_socket: socket.socket, observer: ReceiveObserver, carriers: SeriesCarriers) -> None:
        """Start receivers 1..N-1, accepting from *listen_socket* (``serve``'s)."""
        self.listen_socket = listen_socket
        self.observer, self.carriers = observer, carriers
        for i in range(1, self.configured):
            self.children.append(self._spawn(i))
        deadline = time.monotonic() + _START_TIMEOUT_S
        for c in self.children:  # serve says it listens when every receiver does
            while not c.listening.wait(0.1):
                if not c.proc.is_alive() or time.monotonic() > deadline:
                    log.error("receiver %s (pid %s) did not start listening; it is restarted while serve runs",
                              c.proc.name, c.proc.pid)
                    break

    def _spawn(self, index: int) -> _Child:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        events = self.ctx.Queue()
        proc = self.ctx.Process(target=receiver_main, name=f"receiver-{index}", daemon=False,
                                args=(self.cfg, index, level, os.getpid(), events, str(self.slots_dir),
                                      self.listen_socket))
        proc.start()
        child = _Child(proc, events)
        child.relay = threading.Thread(target=self._relay, args=(child,), name=f"receiver-{index}-events",
                                       daemon=True)
        child.relay.start()
        log.info("receiver %d started (pid %d)", index, proc.pid)
        return child

    def _relay(self, child: _Child) -> None:
        """Apply a receiver's events until it has ended and its queue is empty; then drop what it still carried."""
        carried: Counter[str] = Counter()
        observer, carriers = self.observer, self.carriers
        assert observer is not None and carriers is not None  # start() set them before any receiver ran
        while True:
            try:
                msg = child.events.get(timeout=_POLL_S)
            except queue.Empty:
                if child.ended.is_set():
                    break
                continue
            except (EOFError, OSError):
                break
            # (an event is one write of less than PIPE_BUF bytes, so a receiver killed mid-put leaves no half
            # message to wait for)
            if msg[0] == "listening":
                child.listening.set()
                continue
            try:
                self._apply(msg, carried, observer, carriers)
            except Exception:
                log.exception("could not apply an event of receiver %s", child.proc.name)
        left = list(carried.elements())
        if left:  # its associations died with it: nothing of theirs was released
            carriers.dropped(left, released=False)

    @staticmethod
    def _apply(msg: tuple[Any, ...], carried: Counter[str], observer: ReceiveObserver,
               carriers: SeriesCarriers) -> None:
        kind = msg[0]
        if kind == "instance":
            observer.instance_received(msg[1], msg[2])
        elif kind == "accepted":
            observer.association_accepted()
        elif kind == "rejected":
            observer.association_rejected(msg[1])
        elif kind == "carrying":
            carried[msg[1]] += 1
            carriers.carrying(msg[1])
        elif kind == "dropped":
            carried.subtract(msg[1])
            carried += Counter()  # drop the zeros
            carriers.dropped(list(msg[1]), bool(msg[2]))

    def supervise(self) -> None:
        """Restart receivers that died (call from ``serve``'s main loop)."""
        if self._stopping:
            return
        for i, child in enumerate(self.children):
            if not child.proc.is_alive():  # also reaps it
                log.error("receiver %d (pid %s) exited with %s; restarting it", i + 1, child.proc.pid,
                          child.proc.exitcode)
                child.ended.set()
                self.restarts += 1
                self.children[i] = self._spawn(i + 1)

    def states(self) -> list[ReceiverState]:
        """Every receiver, ``serve`` itself (index 0) first."""
        from dicom_node.serve import pid_alive

        return [ReceiverState(0, os.getpid(), True)] + [
            ReceiverState(i + 1, c.proc.pid, c.proc.pid is not None and pid_alive(c.proc.pid))
            for i, c in enumerate(list(self.children))]

    def terminate(self) -> None:
        """Ask every receiver to stop (each finishes its transfers in flight, as ``serve`` does)."""
        self._stopping = True
        for c in self.children:
            if c.proc.pid and c.proc.is_alive():
                os.kill(c.proc.pid, signal.SIGTERM)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for c in self.children:
            c.proc.join(max(0.1, deadline - time.monotonic()))
            if c.proc.is_alive():
                log.warning("receiver %s (pid %s) did not stop in time; killing it", c.proc.name, c.proc.pid)
                c.proc.kill()
                c.proc.join(5)
            c.ended.set()
        for c in self.children:
            if c.relay is not None:
                c.relay.join(5 * _POLL_S)

    def close(self) -> None:
        shutil.rmtree(self.slots_dir, ignore_errors=True)
