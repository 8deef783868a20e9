"""Run the real ``dicomnode serve`` as a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dicom_node.serve import pid_alive
from netutil import free_port, wait_for_port

DICOMNODE = [sys.executable, "-m", "dicom_node.cli"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_config(folder: Path, sections: dict[str, dict[str, Any]], destinations: list[dict[str, Any]] | None = None) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for d in destinations or []:
        lines.append("[[destinations]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
        lines.append("")
    path = folder / "config.toml"
    path.write_text("\n".join(lines))
    return path


def node_sections(folder: Path, port: int, **over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "max_associations": 10},
        "security": {"allowed_calling_aets": ["STORESCU", "ECHOSCU", "SENDER1", "SENDER2", "SENDER3", "SENDER4", "PYNETDICOM"]},
        "storage": {"dir": str(folder / "var")},
        "series": {"quiet_seconds": 1.0, "min_slices": 4},
        "worker": {"processes": 0},
        "http": {"host": "127.0.0.1", "port": free_port()},  # every node its own: the default port is one per host
    }
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return sections


def wait_for_echo(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Ready = answers C-ECHO (a bare TCP probe would hold an association slot until its ACSE timeout)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.1)
    raise TimeoutError(f"no C-ECHO answer on {port} after {timeout}s")


class NodeProcess:
    def __init__(self, folder: Path, destinations: list[dict[str, Any]] | None = None, **over: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.sections = node_sections(folder, self.port, **over)
        self.config = write_config(folder, self.sections, destinations)
        self.storage = Path(self.sections["storage"]["dir"])
        self.log_path = folder / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60, ready: str = "echo") -> "NodeProcess":
        """Start ``serve``; ready when it answers C-ECHO, or (``ready="port"``, e.g. TLS only) listens."""
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # its own process group: kill9() can take down serve and every process it started, and nothing else
        self.proc = subprocess.Popen([*DICOMNODE, "serve", "--config", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.folder, env=env, start_new_session=True)
        try:
            if ready == "port":
                wait_for_port(self.port, timeout=timeout, proc=self.proc)
            else:
                wait_for_echo(self.port, timeout=timeout, proc=self.proc)
            http = self.sections.get("http", {})
            if http.get("enabled", True) and "port" in http:  # serve opens it just after the DICOM port
                wait_for_port(int(http["port"]), timeout=timeout, proc=self.proc)
        except Exception as e:
            if self.proc.poll() is None:  # started but not ready: take it and what it started down, leave nothing
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            raise RuntimeError(f"dicomnode serve did not start ({e}):\n{self.log()}") from None
        return self

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers of this node's storage folder (from their slot files)."""
        pids = []
        for f in sorted((self.storage / "workers").glob("slot-*.pid")):
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if pid_alive(pid):
                pids.append(pid)
        return pids

    def wait_for_workers(self, n: int, timeout: float = 60, exclude: tuple[int, ...] = ()) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in self.worker_pids() if p not in exclude]
            if len(pids) >= n:
                return pids
            time.sleep(0.1)
        raise AssertionError(f"{n} worker(s) did not start in {timeout} s:\n{self.log()[-3000:]}")

    def kill9(self) -> list[int]:
        """Crash the node as a power loss would: SIGKILL to serve and every process of its group (its workers).

        Returns the PIDs killed besides serve; they are gone (or zombies) on return.
        """
        assert self.proc is not None
        workers = self.worker_pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        wait_gone(workers)
        return workers

    def kill9_serve(self) -> list[int]:
        """SIGKILL to serve alone (its workers are left to notice); returns the workers' PIDs."""
        assert self.proc is not None
        workers = self.worker_pids()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return workers

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([*DICOMNODE, *args, "--config", str(self.config)], capture_output=True, text=True,
                             cwd=self.folder, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"dicomnode {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res

    def status(self, *args: str) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", "--limit", "500", *args).stdout)

    def wait_for(self, predicate: Any, timeout: float = 30, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.status()
            if predicate(st):
                return st
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; status: {json.dumps(st, indent=1)[:3000]}\nlog:\n{self.log()[-4000:]}")

    def http_get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        """(status, body) of GET *path* on this node's HTTP listener (urllib: a real HTTP client)."""
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{self.sections['http']['port']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: 'name{labels}' -> value (labels as the node writes them)."""
        code, body = self.http_get("/metrics")
        assert code == 200, body
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in body.splitlines()
                                         if line and not line.startswith("#"))}

    def series(self, uid: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["series"] if s["series_uid"] == uid), None)


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes still running after {timeout} s: {[p for p in pids if pid_alive(p)]}")
        time.sleep(0.05)


def pynetdicom_send(port: int, datasets: list[Any], calling: str = "PYNETDICOM", called: str = "DICOMNODE",
                    on_status: Any = None) -> list[int | None]:
    """Send with a pynetdicom SCU over one association; returns each status (None = no response)."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    classes = sorted({str(ds.SOPClassUID) if hasattr(ds, "SOPClassUID") else _path_class(ds) for ds in datasets})
    contexts = [build_context(c) for c in classes]
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None] * len(datasets)
    out: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            out.append(code)
            if on_status:
                on_status(ds, code)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    out += [None] * (len(datasets) - len(out))
    return out


def _path_class(p: Any) -> str:
    from pydicom import dcmread

    return str(dcmread(p, stop_before_pixels=True).SOPClassUID)


def ledger_rows(node: NodeProcess, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a read-only SQL query on the node's SQLite ledger."""
    import sqlite3

    con = sqlite3.connect(node.storage / "ledger.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def freeze_outside_ledger_write(node: NodeProcess, pid: int, timeout: float = 10) -> None:
    """SIGSTOP *pid* at a moment it holds no ledger write transaction.

    A process frozen inside a SQLite write transaction blocks every other writer, including the next
    ``serve``'s start-up, until it runs again; a test of a stuck worker's slot must not freeze it there.
    """
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        os.kill(pid, signal.SIGSTOP)
        con = sqlite3.connect(node.storage / "ledger.db", timeout=0, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:  # frozen mid-transaction: let it finish and try again
            os.kill(pid, signal.SIGCONT)
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} kept the ledger's write lock for {timeout} s") from None
            time.sleep(0.05)
        finally:
            con.close()


def spooled(node: NodeProcess, ds: Any) -> Path:
    """Where the node's spool keeps the instance *ds*."""
    return node.storage / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
