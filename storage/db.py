"""Engine creation and schema migration.

This is the one place that knows about SQLite: WAL journal, busy timeout and
foreign keys are set here.  Every other module uses portable SQLAlchemy so
``ledger_url`` can point at PostgreSQL.

Durability note: SQLite runs with ``synchronous=NORMAL`` in WAL mode.  A crash
of the process never loses a committed transaction; a power loss can lose the
last few.  The spool is the source of truth for instances (each file is
fsynced before its row is written) and :meth:`Ledger.reconcile` re-indexes any
spooled file that has no row at start-up, so nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from storage.models import Base, Meta

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

#: migrations[n] upgrades a ledger from version n to n + 1
MIGRATIONS: dict[int, Callable[[Session], None]] = {}


class LedgerError(RuntimeError):
    """The ledger cannot be opened or migrated."""


def make_engine(url: str) -> Engine:
    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if u.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling would defer BEGIN; take it over
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # take the write lock at BEGIN so concurrent writers queue on busy_timeout
            # instead of failing with "database is locked" on lock upgrade
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> int:
    """Create or upgrade the schema; returns the version now in place."""
    insp = inspect(engine)
    with Session(engine) as session, session.begin():
        if not insp.has_table("meta"):
            Base.metadata.create_all(session.connection())
            session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            log.info("ledger created (schema v%d)", SCHEMA_VERSION)
            return SCHEMA_VERSION
        row = session.scalar(select(Meta).where(Meta.key == "schema_version"))
        version = int(row.value) if row else 0
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger schema v{version} is newer than this dicomnode understands (v{SCHEMA_VERSION}); upgrade dicomnode"
            )
        while version < SCHEMA_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise LedgerError(f"no migration from ledger schema v{version}")
            step(session)
            version += 1
            log.info("ledger migrated to schema v%d", version)
        Base.metadata.create_all(session.connection())  # tables added since (idempotent)
        if row is None:
            session.add(Meta(key="schema_version", value=str(version)))
        else:
            row.value = str(version)
        return version
