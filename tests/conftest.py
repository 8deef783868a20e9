from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

# make tests/ helpers importable as plain modules (dicomgen, netutil)
sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from pgserver import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """One real PostgreSQL server for the session (tests/pgserver.py); each test makes its own database.

    Skipped, with the reason, where PostgreSQL or psycopg is missing or the server does not start, unless
    ``DICOMNODE_REQUIRE_POSTGRES=1`` (set by .ci/run, which installs it): then that is a failure.
    """
    server = start_postgres_or_skip()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator["PostgresServer"]:
    """A PostgreSQL server of this test alone (e.g. to stop and restart it)."""
    server = start_postgres_or_skip()
    try:
        yield server
    finally:
        server.stop()


def start_postgres_or_skip() -> "PostgresServer":
    from pgserver import PostgresServer, PostgresUnavailable

    try:
        import psycopg  # noqa: F401
        return PostgresServer().start()
    except (PostgresUnavailable, ImportError, OSError, subprocess.TimeoutExpired) as exc:
        if os.environ.get("DICOMNODE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required here (DICOMNODE_REQUIRE_POSTGRES=1) but: {exc}")
        pytest.skip(f"no PostgreSQL server for these tests: {exc}")
