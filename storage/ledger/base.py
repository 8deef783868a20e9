"""What every part of the ledger shares: the engine, sessions, the schema check, UTC timestamps."""

from __future__ import annotations

from datetime import datetime, timezone

from typing import Any, cast

from sqlalchemy import CursorResult, Result, Table
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from storage.db import BUSY_TIMEOUT_S, check_schema, checkpoint, make_engine, make_read_only_engine, migrate

__all__ = ["LedgerBase", "iso", "rowcount", "table", "utcnow"]


def utcnow() -> datetime:
    """Naive UTC (portable across SQLite and PostgreSQL ``timestamp``)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (executed, it is a CursorResult)."""
    return cast("CursorResult[Any]", result).rowcount


def table(model: type[DeclarativeBase]) -> Table:
    """The Core table of a mapped class (for statements built once and run without the ORM)."""
    t = model.__table__
    assert isinstance(t, Table)
    return t


class LedgerBase:
    def __init__(self, url: str, *, background_checkpoints: bool = False, read_only: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        """Open (creating or migrating) the ledger at *url*.

        With *read_only* (``dicomnode status``) nothing is created, migrated
        or written and no write lock is ever taken; only reading methods work.
        """
        self.url = url
        self.read_only = read_only
        self._tables: set[str] | None = None  # None: every table of the current schema exists
        if read_only:
            self.engine = make_read_only_engine(url)
            try:
                self.schema_version, self._tables = check_schema(self.engine)
            except BaseException:
                self.engine.dispose()
                raise
        else:
            self.engine = make_engine(url, background_checkpoints=background_checkpoints, busy_timeout=busy_timeout)
            try:
                self.schema_version = migrate(self.engine).after
            except BaseException:
                self.engine.dispose()
                raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._fast_path = bool(self.engine.dialect.update_returning)  # SQLite >= 3.35, PostgreSQL

    def close(self) -> None:
        self.engine.dispose()

    def has_table(self, name: str) -> bool:
        """False only for a table an older ledger, opened read-only, does not have yet."""
        return self._tables is None or name in self._tables

    def checkpoint(self) -> tuple[int, int] | None:
        """Housekeeping off the receive path (see :func:`storage.db.checkpoint`)."""
        return checkpoint(self.engine)

    def session(self) -> Session:
        return self._session()
