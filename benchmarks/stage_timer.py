#!/usr/bin/env python3
"""Run ``dicomnode`` with the intake's stages timed; used by ``ingest.py --stages``.

Usage: python benchmarks/stage_timer.py OUT.json -- <dicomnode arguments>

Each stage of :meth:`Intake.store` (header read, facts, checks, spool commit,
ledger row) is wrapped with a wall-clock timer; at exit the durations are
written to OUT.json as ``{stage: [ms, ...]}``.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node import cli, intake  # noqa: E402
from storage import ledger, spool  # noqa: E402

DURATIONS: dict[str, list[float]] = {}


def timed(owner: Any, name: str, stage: str) -> None:
    fn: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            DURATIONS.setdefault(stage, []).append((time.perf_counter() - t0) * 1000)

    setattr(owner, name, wrapper)


def main() -> None:
    out, sep, *rest = sys.argv[1:]
    if sep != "--":
        raise SystemExit(__doc__)
    for owner, name, stage in (
        (spool.Spool, "start_writeback", "early writeback"),
        (intake, "read_header", "header read"),
        (intake, "header_facts", "selection facts"),
        (intake, "validate", "checks"),
        (spool.Spool, "commit", "spool commit (fsync, rename, folder fsync)"),
        (ledger.Ledger, "record_instance", "ledger row"),
        (intake.Intake, "store", "whole C-STORE handler"),
    ):
        timed(owner, name, stage)
    atexit.register(lambda: Path(out).write_text(json.dumps(DURATIONS)))
    sys.argv = ["dicomnode", *rest]
    cli.main()


if __name__ == "__main__":
    main()
