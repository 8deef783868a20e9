"""A real PostgreSQL server for tests and benchmarks: Debian's binaries, a temporary folder, a free port.

``initdb`` and ``postgres`` refuse to run as root, so as root the server runs
as the ``postgres`` user (``runuser``) in a folder it owns.  Trust
authentication, TCP on 127.0.0.1 only, the unix socket inside the folder.
The server is stopped with ``pg_ctl stop`` (and by its recorded PID if that
fails); the folder is removed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from netutil import free_port

SUPERUSER = "dicomnode"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed or could not be started here (the message says why)."""


def postgres_bindir() -> Path:
    """Newest ``/usr/lib/postgresql/<version>/bin`` holding initdb (Debian's layout), else PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")


class PostgresServer:
    """One throw-away PostgreSQL cluster.  ``fsync=False`` for tests: what is tested is the ledger, not PostgreSQL's
    own durability."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = postgres_bindir()
        self.fsync = fsync
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.pid: int | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
            if user is None:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
            pw = pwd.getpwnam(user)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", user, "--"]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.folder, stdin=subprocess.DEVNULL)

    def start(self) -> "PostgresServer":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        init = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                         "--encoding=UTF8", "--locale=C", "--no-sync")
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {(init.stderr or init.stdout).strip()[-800:]}")
        self.resume()

    def resume(self) -> None:
        """Start the server on its cluster (after :meth:`pause`: the same port and data)."""
        opts = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200 "
                f"-c fsync={'on' if self.fsync else 'off'} -c full_page_writes={'on' if self.fsync else 'off'}")
        if not self.fsync:
            opts += " -c synchronous_commit=off"
        res = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", opts,
                        "-w", "-t", "60", "start", timeout=90)
        self.pid = self._recorded_pid()
        if res.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed: {res.stdout.strip()[-400:]} {self.log()[-800:]}")

    def pause(self) -> None:
        """Stop the server, keeping its data (an outage of the database; :meth:`resume` brings it back)."""
        res = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        if res.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {res.stdout.strip()[-400:]}")
        self.pid = None

    def _recorded_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        pid = self.pid or self._recorded_pid()
        if self.data.is_dir() and pid is not None:
            res = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            if res.returncode != 0:
                _kill(pid)
        elif pid is not None:
            _kill(pid)
        self.pid = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGQUIT)  # postgres: immediate shutdown of the postmaster and its children
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
