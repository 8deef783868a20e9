"""Ledger schema migrations (Alembic): a new ledger, a ledger from before migrations, a newer ledger,
processes starting together, and ``dicomnode migrate``."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine

from dicom_node.cli import cli
from nodeproc import node_sections, write_config
from storage.db import LedgerError, schema_head
from storage.ledger import Ledger
from storage.models import Base
from test_ledger import rec


def differences(url: str) -> list[object]:
    """What separates the ledger's schema from the models (empty: the migrations build exactly the models)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def revision(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return str(con.execute("select version_num from alembic_version").fetchone()[0])
    finally:
        con.close()


def test_a_new_ledger_is_built_by_the_migrations_exactly_as_the_models_describe(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    led = Ledger(f"sqlite:///{db}")
    led.close()
    assert led.schema_version == schema_head() >= 1
    assert revision(db) == f"{schema_head():04d}"
    assert differences(f"sqlite:///{db}") == []


def test_a_ledger_from_before_migrations_is_adopted_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    url = f"sqlite:///{db}"
    engine = create_engine(url)
    # schema v1 as the first v1 builds created it (without the tables added late in v1)
    early_v1 = ("meta", "series", "instances", "rejections", "jobs", "deliveries")
    Base.metadata.create_all(engine, tables=[Base.metadata.tables[n] for n in early_v1])
    with engine.begin() as conn:
        conn.exec_driver_sql("insert into meta (key, value) values ('schema_version', '1')")
    engine.dispose()
    con = sqlite3.connect(db)
    con.execute("insert into series (study_uid, series_uid, state, generation, instances, calling_aet, "
                "first_received_at, last_received_at) values ('1.2', '1.2.3', 'receiving', 1, 0, 'A', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    con.commit()
    con.close()

    led = Ledger(url)
    try:
        assert led.schema_version == schema_head()
        led.record_instance(rec("1.9.1", series="1.2.3"))  # the old series row is still there and usable
        assert [s.series_uid for s in led.status().series] == ["1.2.3"]
    finally:
        led.close()
    assert revision(db) == f"{schema_head():04d}"
    assert differences(url) == []


def test_a_ledger_newer_than_this_dicomnode_is_refused_by_writers_and_readers(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    Ledger(f"sqlite:///{db}").close()
    con = sqlite3.connect(db)
    con.execute("update alembic_version set version_num = '0999'")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="0999 is newer than this dicomnode"):
        Ledger(f"sqlite:///{db}")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(f"sqlite:///{db}", read_only=True)


def test_processes_starting_together_on_a_new_ledger_migrate_it_once(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    code = f"from storage.ledger import Ledger; Ledger({f'sqlite:///{db}'!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert revision(db) == f"{schema_head():04d}"
    assert differences(f"sqlite:///{db}") == []


def test_dicomnode_migrate_creates_then_reports_up_to_date(tmp_path: Path) -> None:
    config = write_config(tmp_path, node_sections(tmp_path, 11112))
    run = CliRunner()
    first = run.invoke(cli, ["migrate", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert f"created (schema v{schema_head()})" in first.output
    again = run.invoke(cli, ["migrate", "--config", str(config)])
    assert again.exit_code == 0 and "up to date" in again.output


def test_dicomnode_migrate_on_an_unreachable_ledger_is_one_line_and_exit_2(tmp_path: Path) -> None:
    sections = node_sections(tmp_path, 11112)
    sections["storage"]["ledger_url"] = "postgresql+psycopg://dicomnode:secret@127.0.0.1:1/ledger"
    config = write_config(tmp_path, sections)
    r = CliRunner().invoke(cli, ["migrate", "--config", str(config)])
    assert r.exit_code == 2, r.output
    assert "secret" not in r.output  # the password is never printed
    assert len(r.output.strip().splitlines()) == 1


def test_on_postgresql_the_migrations_build_the_models_schema_and_concurrent_starts_migrate_once(
        postgres: "PostgresServer") -> None:  # type: ignore[name-defined]  # noqa: F821
    url = postgres.create_database()
    code = ("import logging; logging.basicConfig(level=logging.INFO); logging.getLogger('alembic').setLevel(30); "
            f"from storage.ledger import Ledger; Ledger({url!r}).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert sum("ledger created" in e for e in errors) == 1  # one migrated; the others found it done
    led = Ledger(url)
    led.close()
    assert led.schema_version == schema_head()
    assert differences(url) == []


@pytest.mark.parametrize("args", [["status"], ["retry", "1"], ["release", "1"], ["prune"], ["prune", "--dry-run"]],
                         ids=lambda a: " ".join(a))
def test_every_ledger_command_on_an_unreachable_ledger_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    sections = node_sections(tmp_path, 11112)
    sections["storage"]["ledger_url"] = "postgresql+psycopg://dicomnode:secret@127.0.0.1:1/ledger"
    config = write_config(tmp_path, sections)
    r = CliRunner().invoke(cli, [*args, "--config", str(config)])
    assert r.exit_code == 2, r.output
    assert "secret" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
