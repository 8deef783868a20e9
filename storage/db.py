"""Engine creation and schema migration.

This is the one place that knows about SQLite: WAL journal, busy timeout and
foreign keys are set here.  Every other module uses portable SQLAlchemy so
``ledger_url`` can point at PostgreSQL.  The schema is migrated with Alembic
(:mod:`storage.migrations`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, delete, event, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from storage.models import Meta

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class LedgerError(RuntimeError):
    """The ledger cannot be opened or migrated."""


#: WAL pages after which a committing connection folds the WAL back itself, when
#: checkpoints are normally run in the background (a safety net, about 40 MB)
LAZY_AUTOCHECKPOINT_PAGES = 10000

#: how long a writer waits for SQLite's write lock before giving up
BUSY_TIMEOUT_S = 60.0


def make_engine(url: str, *, background_checkpoints: bool = False, busy_timeout: float = BUSY_TIMEOUT_S) -> Engine:
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
        kwargs["connect_args"] = {"timeout": busy_timeout, "check_same_thread": False}
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
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
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


def _scripts() -> ScriptDirectory:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def schema_head() -> int:
    """The schema version this dicomnode builds: its newest migration."""
    return int(_scripts().get_current_head() or 0)


def _version_of(conn: Connection, tables: set[str]) -> int | None:
    """The ledger's schema version: its Alembic revision, or ``meta.schema_version`` of a ledger from before
    Alembic (version 1); None for an empty database.  Refuses a ledger newer than this dicomnode."""
    head = schema_head()
    newer = f"is newer than this dicomnode understands (v{head}); upgrade dicomnode"
    recorded: int | None = None
    if "meta" in tables:
        row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        recorded = int(row) if row else 0
        if recorded > head:
            raise LedgerError(f"ledger schema v{recorded} {newer}")
    if "alembic_version" in tables:
        rev = MigrationContext.configure(conn).get_current_revision()
        if rev is not None and rev not in {s.revision for s in _scripts().walk_revisions()}:
            raise LedgerError(f"ledger schema {rev} {newer}")
        return int(rev) if rev is not None else recorded
    return recorded


def check_schema(engine: Engine) -> tuple[int, set[str]]:
    """(schema version, table names) of an existing ledger, without changing it."""
    tables = set(inspect(engine).get_table_names())
    if "meta" not in tables or "jobs" not in tables:
        raise LedgerError("not a dicomnode ledger (no meta/jobs tables)")
    with engine.connect() as conn:
        version = _version_of(conn, tables)
    return version or 0, tables


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


def _note_write_lock(engine: Engine) -> None:
    """Log once, before waiting, when another process holds SQLite's write lock (a stuck process would
    otherwise look like a silent hang for the whole busy timeout)."""
    if engine.dialect.name != "sqlite":
        return
    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        assert dbapi is not None
        (timeout_ms,) = dbapi.execute("PRAGMA busy_timeout").fetchone()
        dbapi.execute("PRAGMA busy_timeout=0")
        try:
            dbapi.execute("BEGIN IMMEDIATE")
            dbapi.execute("ROLLBACK")
        except sqlite3.OperationalError:
            log.warning("ledger %s is write-locked by another process; waiting up to %.0f s for it",
                        engine.url.database, timeout_ms / 1000)
        finally:
            dbapi.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
    finally:
        raw.close()


@dataclass(frozen=True)
class SchemaChange:
    """What :func:`migrate` did: the version before (None: a new ledger) and the version now in place."""

    before: int | None
    after: int


def migrate(engine: Engine) -> SchemaChange:
    """Create or upgrade the schema to :func:`schema_head`.

    One transaction (SQLite: under the write lock; PostgreSQL: under an advisory lock), so processes that
    start together migrate once.  Raises :class:`LedgerError` for a ledger newer than this dicomnode, or
    when another process keeps the ledger write-locked past the busy timeout.
    """
    _note_write_lock(engine)
    try:
        return _migrate(engine)
    except (OperationalError, sqlite3.OperationalError) as exc:  # the raw one comes from the BEGIN hook
        if "locked" not in str(exc):
            raise
        raise LedgerError(f"{engine.url.database} stayed write-locked by another process; is a dicomnode process "
                          "stopped or stuck, or a tool holding a transaction open?") from None


#: key of the PostgreSQL advisory lock that serialises migrations (any constant; "dcmnode" in ASCII)
_PG_MIGRATION_LOCK = 0x64636D6E6F6465


def _migrate(engine: Engine) -> SchemaChange:
    head = schema_head()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        before = _version_of(conn, set(inspect(conn).get_table_names()))
        adopting = before is not None and MigrationContext.configure(conn).get_current_revision() is None
        if before == head and not adopting:
            return SchemaChange(before, head)
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = conn
        alembic_command.upgrade(cfg, "head")
        conn.execute(delete(Meta).where(Meta.key == "schema_version"))
        conn.execute(insert(Meta).values(key="schema_version", value=str(head)))  # what older builds check
        if before is None:
            log.info("ledger created (schema v%d)", head)
        elif adopting:
            # a ledger from before migrations: v1, perhaps without the tables added late in v1 (the first
            # revision creates only the tables it lacks)
            log.info("ledger from before schema migrations (v%d) adopted; schema v%d", before, head)
        else:
            log.info("ledger migrated from schema v%d to v%d", before, head)
        return SchemaChange(before, head)
