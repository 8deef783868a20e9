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
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from storage.models import Base, Meta

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

#: PostgreSQL advisory lock held while the schema is created or migrated (any fixed 64-bit number)
MIGRATION_LOCK_KEY = 0x6469636F6D6E6F  # "dicomno"

#: migrations[n] upgrades a ledger from version n to n + 1
MIGRATIONS: dict[int, Callable[[Session], None]] = {}


class LedgerError(RuntimeError):
    """The ledger cannot be opened or migrated."""


#: WAL pages after which a committing connection folds the WAL back itself, when
#: checkpoints are normally run in the background (a safety net, about 40 MB)
LAZY_AUTOCHECKPOINT_PAGES = 10000


def make_engine(url: str, *, background_checkpoints: bool = False) -> Engine:
    """An engine for *url*; SQLite gets its pragmas here.

    With *background_checkpoints* the caller runs :func:`checkpoint` every few
    seconds, so that a write transaction (one per received instance) does not
    pay for folding the WAL back into the database now and then (up to 15 ms).
    """
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
            if background_checkpoints:
                cur.execute(f"PRAGMA wal_autocheckpoint={LAZY_AUTOCHECKPOINT_PAGES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # take the write lock at BEGIN so concurrent writers queue on busy_timeout
            # instead of failing with "database is locked" on lock upgrade
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")

    return engine


def make_read_only_engine(url: str) -> Engine:
    """An engine that only reads: no file or folder is created, nothing is written, no write lock is taken.

    SQLite: the database must exist; reads run in deferred transactions
    (WAL readers never wait for a writer) with ``query_only`` on.
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)  # MVCC: readers never wait for writers; nothing is migrated
    db = u.database
    if not db or db == ":memory:":
        raise LedgerError("an in-memory ledger cannot be read from another process")
    if not Path(db).is_file():
        raise LedgerError(f"no ledger at {db} (it is created when `dicomnode serve` starts)")
    uri = f"file:{urllib.parse.quote(str(Path(db).resolve()))}?mode=rw"  # rw: never create; query_only: never write

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(uri, uri=True, timeout=5, check_same_thread=False, isolation_level=None)
        con.execute("PRAGMA query_only=ON")
        con.execute("PRAGMA busy_timeout=5000")
        return con

    engine = create_engine("sqlite://", creator=connect)

    @event.listens_for(engine, "begin")
    def _sqlite_begin_deferred(conn: Any) -> None:
        conn.connection.driver_connection.execute("BEGIN")  # a read snapshot; takes no write lock

    return engine


def check_schema(engine: Engine) -> tuple[int, set[str]]:
    """(schema version, table names) of an existing ledger, without changing it."""
    insp = inspect(engine)
    tables = set(insp.get_table_names())
    if "meta" not in tables or "jobs" not in tables:
        raise LedgerError("not a dicomnode ledger (no meta/jobs tables)")
    with Session(engine) as session:
        row = session.scalar(select(Meta).where(Meta.key == "schema_version"))
    version = int(row.value) if row else 0
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger schema v{version} is newer than this dicomnode understands (v{SCHEMA_VERSION}); upgrade dicomnode"
        )
    return version, tables


def checkpoint(engine: Engine) -> tuple[int, int] | None:
    """Fold SQLite's write-ahead log back into the database without blocking anyone.

    Returns (frames in the log, frames folded back); None for other databases.
    """
    if engine.dialect.name != "sqlite":
        return None
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        assert dbapi is not None
        _busy, log_frames, done = dbapi.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return log_frames, done
    finally:
        raw.close()


def migrate(engine: Engine) -> int:
    """Create or upgrade the schema; returns the version now in place.

    Processes that start together (a ``serve`` and workers on other machines) migrate one after the
    other: on PostgreSQL under a transaction-scoped advisory lock, on SQLite under the write lock that
    BEGIN IMMEDIATE takes; each looks at the schema only once it holds the lock.
    """
    with Session(engine) as session, session.begin():
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        insp = inspect(session.connection())
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
