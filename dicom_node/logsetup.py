"""Logging configuration for the node's entry points (the CLI and worker processes)."""

from __future__ import annotations

import logging
import sys


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the moment of writing: a live progress bar (rich) redirects it, so log lines
    are printed above the bar instead of glued onto it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "INFO", *, keep_existing: bool = False) -> None:
    """Log to stderr at *level*; with *keep_existing*, leave a configuration already in place alone."""
    if keep_existing and logging.getLogger().handlers:
        return
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s",
        stream=_CurrentStderr(),
        force=True,
    )
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Alembic announces its set-up at INFO on every start; storage.db logs what was migrated
    logging.getLogger("alembic").setLevel(logging.WARNING)
