"""``python -m storage.migrations revision "message"``: write the next revision, generated from the models
against a scratch SQLite ledger at the current head (check it by hand: Alembic does not see every change)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from storage.db import MIGRATIONS_DIR, make_engine, migrate, schema_head


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "revision":
        print('usage: python -m storage.migrations revision "what changes"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        head = schema_head()
        if head:
            migrate(engine)
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.attributes["connection"] = conn
            command.revision(cfg, message=argv[1], autogenerate=True, rev_id=f"{head + 1:04d}")
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
