"""Ledger schema revisions, one file per schema version (see :mod:`storage.migrations`)."""
