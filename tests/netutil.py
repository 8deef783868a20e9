"""Loopback helpers for tests: free ports, waiting for listeners, real peers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
needs_orthanc = pytest.mark.skipif(shutil.which("Orthanc") is None, reason="orthanc is not installed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _without_own_scripts() -> str:
    """PATH without this interpreter's own scripts folder, where pynetdicom 3 installs ``storescu``, ``storescp``,
    ``echoscu`` and others of its own, with other options and messages than dcmtk's."""
    own = Path(sys.executable).parent.resolve()
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != own)


def dcmtk(tool: str) -> str:
    """The path of dcmtk's *tool* (the bare name when it is not installed)."""
    return shutil.which(tool, path=_without_own_scripts()) or tool


needs_dcmtk = pytest.mark.skipif(shutil.which("storescu", path=_without_own_scripts()) is None,
                                 reason="dcmtk is not installed")


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: Nagle off, as the node does for its own sockets."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


class DcmtkStoreSCP:
    """A real dcmtk ``storescp`` on loopback, writing into *folder*."""

    def __init__(self, folder: Path, ae_title: str = "STORESCP", port: int | None = None, extra: list[str] | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "DcmtkStoreSCP":
        self.start()
        return self

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", self.ae_title, "--output-directory", str(self.folder), *self.extra, str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(port: int, files: list[Path] | Path, called: str = "DICOMNODE", calling: str = "STORESCU",
             extra: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Send with dcmtk storescu over one association; returns the finished process."""
    args = [dcmtk("storescu"), "-aet", calling, "-aec", called, *(extra or [])]
    if isinstance(files, Path) and files.is_dir():
        args += ["--scan-directories", "127.0.0.1", str(port), str(files)]
    else:
        args += ["127.0.0.1", str(port), *[str(f) for f in (files if isinstance(files, list) else [files])]]
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


class PynetdicomStoreSCP:
    """A pynetdicom Storage SCP on loopback that answers C-STORE with chosen statuses.

    ``status`` is either one status for every request or a callable
    ``(index, dataset) -> int`` (index counts requests from 0 over the SCP's
    life); ``delay`` seconds are slept before answering request ``delay_at``
    (e.g. to provoke the sender's DIMSE timeout).  Received SOP Instance UIDs
    are kept in ``received``.  ``sop_classes`` limits what it accepts (default:
    every storage SOP class) and ``transfer_syntaxes`` which syntaxes (default:
    pynetdicom's uncompressed ones); ``ssl_context`` (server side) makes it a TLS peer.
    """

    def __init__(self, status: "int | Callable[[int, Any], int]" = 0x0000, *, ae_title: str = "STORESCP",
                 sop_classes: "Sequence[str] | None" = None, require_called_aet: bool = True,
                 delay: float = 0.0, delay_at: int = -1, ssl_context: Any = None,
                 transfer_syntaxes: "Sequence[str] | None" = None) -> None:
        self.transfer_syntaxes = transfer_syntaxes
        self.status = status
        self.ssl_context = ssl_context
        self.ae_title = ae_title
        self.sop_classes = sop_classes
        self.require_called_aet = require_called_aet
        self.delay = delay
        self.delay_at = delay_at
        self.port = free_port()
        self.received: list[str] = []
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        index = len(self.received)
        ds = event.dataset
        self.received.append(str(ds.SOPInstanceUID))
        if index == self.delay_at and self.delay:
            time.sleep(self.delay)
        return self.status(index, ds) if callable(self.status) else self.status

    def __enter__(self) -> "PynetdicomStoreSCP":
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES

        syntaxes = list(self.transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        classes = self.sop_classes or [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        for uid in classes:
            ae.add_supported_context(uid, syntaxes)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def self_signed_cert(folder: Path, name: str = "peer") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost (openssl CLI): (cert, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
