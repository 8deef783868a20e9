"""What every child process of ``dicomnode serve`` (workers, receivers) does to end with its parent."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

__all__ = ["ORPHAN_GRACE_SECONDS", "watch_parent"]

log = logging.getLogger(__name__)


#: seconds a worker whose parent died has to hand its job back before it exits hard
ORPHAN_GRACE_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send *signum* to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, grace: float = ORPHAN_GRACE_SECONDS, interval: float = 0.5) -> None:
    """Make this process end when *parent_pid* (``dicomnode serve``) dies, even by ``kill -9``.

    On Linux the kernel sends SIGTERM at once (PR_SET_PDEATHSIG); everywhere a
    daemon thread notices the new parent PID within *interval* and sends the
    same SIGTERM (a job in progress is handed back), then exits hard after
    *grace* seconds if the process has not stopped by then (e.g. inside a long
    native inference call).
    """
    _set_parent_death_signal(signal.SIGTERM)

    def orphaned() -> bool:
        return os.getppid() != parent_pid

    def watch() -> None:
        while not orphaned():
            time.sleep(interval)
        log.warning("%s (pid %d): parent %d is gone; stopping", mp.current_process().name, os.getpid(), parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(3)

    if orphaned():  # the parent died before we got here
        log.warning("%s (pid %d): parent %d is gone; not starting", mp.current_process().name, os.getpid(), parent_pid)
        raise SystemExit(3)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
