"""What a worker of ``serve`` reports once its models are loaded: ``<storage.dir>/workers/slot-N.ready.json``.

Written by the worker (atomically: a temporary file renamed into place) after
its warm-up, read by ``serve``'s ``/healthz`` and ``/metrics``.  A report
counts only while the PID in it is the slot's live worker, so a report left
by a worker that died never makes its successor look ready.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LoadedModelInfo", "ReadyReport", "read_ready", "ready_path", "remove_ready", "write_ready"]


@dataclass(frozen=True)
class LoadedModelInfo:
    name: str
    version: str
    identity: str  # what the built series record (name-version-digest)
    weights_sha256: str
    engine: str


@dataclass(frozen=True)
class ReadyReport:
    pid: int
    models: dict[str, LoadedModelInfo] = field(default_factory=dict)  # by direction
    errors: dict[str, str] = field(default_factory=dict)  # direction -> why its model could not be loaded


def ready_path(storage_dir: Path, index: int) -> Path:
    return storage_dir / "workers" / f"slot-{index}.ready.json"


def write_ready(path: Path, report: ReadyReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"pid": report.pid, "errors": report.errors,
            "models": {d: vars(m) for d, m in report.models.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, sort_keys=True))
    os.replace(tmp, path)


def remove_ready(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def read_ready(path: Path) -> ReadyReport | None:
    """The report in *path*; None if there is none or it cannot be read."""
    try:
        raw: Any = json.loads(path.read_text())
        models = {str(d): LoadedModelInfo(**{k: str(m[k]) for k in ("name", "version", "identity", "weights_sha256",
                                                                       "engine")})
                  for d, m in dict(raw.get("models") or {}).items()}
        return ReadyReport(int(raw["pid"]), models, {str(k): str(v) for k, v in dict(raw.get("errors") or {}).items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
