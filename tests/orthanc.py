"""A real Orthanc PACS on loopback for tests, with small REST helpers (urllib only).

Use it as a context manager::

    with OrthancServer(tmp_path / "orthanc") as pacs:
        deliver(files, pacs.destination(), calling_ae_title="DICOMNODE")
        series = pacs.series_of_study(study_uid)

or through the pytest fixtures ``orthanc`` (one per test) and ``orthanc_module``
(one per test module), imported into a test module with
``from orthanc import orthanc  # noqa: F401``.

Orthanc 1.10 (Debian) listens for DICOM on all interfaces (no bind address
option); HTTP is restricted to loopback by ``RemoteAccessAllowed: false``.
Teardown kills the process (Orthanc's own shutdown takes seconds); a failed start raises
:class:`OrthancError` with the tail of Orthanc's log.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from netutil import dcmtk_env, free_port, wait_for_port

ORTHANC_BIN = shutil.which("Orthanc")

needs_orthanc = pytest.mark.skipif(ORTHANC_BIN is None, reason="Orthanc is not installed")


class OrthancError(RuntimeError):
    """Orthanc failed to start or a REST call failed."""


class OrthancServer:
    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC", check_called_aet: bool = True,
                 extra_config: dict[str, Any] | None = None, start_timeout: float = 60.0) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.host = "127.0.0.1"
        self.start_timeout = start_timeout
        self.config: dict[str, Any] = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "TemporaryDirectory": str(self.folder / "tmp"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": False,
            "OverwriteInstances": True,  # a re-run replaces the same instances
            "StableAge": 2,
            "SaveJobs": False,
            "JobsHistorySize": 10,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 10,
            "TcpNoDelay": True,
            "KeepAlive": False,
            "ExecuteLuaEnabled": False,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }
        self.config.update(extra_config or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "orthanc.log"

    # ---------------------------------------------------------------- process

    def __enter__(self) -> "OrthancServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self) -> None:
        if ORTHANC_BIN is None:
            raise OrthancError("the Orthanc binary is not on PATH (apt-get install orthanc)")
        for sub in ("storage", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        log = open(self.log_path, "wb")
        try:
            # TCP_NODELAY=1: Orthanc's DICOM server is dcmtk, which reads it from the
            # environment; with Nagle on, every C-STORE response waits ~40 ms.
            self.proc = subprocess.Popen([ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.folder, env=dcmtk_env(), start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        try:
            wait_for_port(self.http_port, timeout=self.start_timeout, proc=self.proc)
            wait_for_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()), proc=self.proc)
            while True:  # REST answering means the database is open
                try:
                    self.get("/system")
                    break
                except OrthancError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise OrthancError(f"Orthanc did not start: {exc}\n--- orthanc.log (tail) ---\n{self.log_tail()}") from None

    def stop(self, graceful: bool = False) -> None:
        """Kill Orthanc (instant), or with ``graceful`` let it shut down (about 3.5 s).

        Either way the storage stays, so :meth:`start` brings the same PACS back
        on the same ports (e.g. "destination down, then up again").
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def destination(self, **kw: Any) -> Any:
        """A :class:`dicom_node.config.Destination` for this server."""
        from dicom_node.config import Destination

        return Destination(ae_title=self.ae_title, host=self.host, port=self.dicom_port, name="orthanc", **kw)

    # ---------------------------------------------------------------- REST

    def _request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                payload = rsp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{method} {path}: {exc}") from None
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        """Orthanc ids of resources at ``level`` (Patient/Study/Series/Instance) matching ``query``."""
        return list(self.post("/tools/find", {"Level": level, "Query": query}))

    def study_id(self, study_uid: str) -> str | None:
        ids = self.find("Study", {"StudyInstanceUID": study_uid})
        return ids[0] if ids else None

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series of the study: Orthanc's series objects (MainDicomTags, Instances, ...)."""
        sid = self.study_id(study_uid)
        return [] if sid is None else list(self.get(f"/studies/{sid}/series"))

    def series_by_uid(self, series_uid: str) -> dict[str, Any] | None:
        ids = self.find("Series", {"SeriesInstanceUID": series_uid})
        return self.get(f"/series/{ids[0]}") if ids else None

    def instances_of_series(self, series_uid: str) -> list[dict[str, Any]]:
        ids = self.find("Series", {"SeriesInstanceUID": series_uid})
        return [] if not ids else list(self.get(f"/series/{ids[0]}/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword -> value."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_tags_by_number(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/tags?short``: "gggg,eeee" (lower case) -> value; also tags Orthanc's dictionary lacks."""
        return dict(self.get(f"/instances/{instance_id}/tags?short"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file, to read back with pydicom."""
        return bytes(self._request("GET", f"/instances/{instance_id}/file", raw=True))

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc for one test."""
    if ORTHANC_BIN is None:
        pytest.skip("Orthanc is not installed")
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc shared by a test module (tests must use distinct studies)."""
    if ORTHANC_BIN is None:
        pytest.skip("Orthanc is not installed")
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
