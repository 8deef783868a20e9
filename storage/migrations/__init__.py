"""Ledger schema migrations (Alembic), applied by ``dicomnode serve`` and ``dicomnode worker`` at start and by
``dicomnode migrate``; see :func:`storage.db.migrate`.

Revisions are numbered ``0001``, ``0002``...; the number is the ledger's schema version, also written to the
``meta`` table so that an older dicomnode refuses a ledger newer than it understands.  A new revision is
generated from the models, checked by hand, and named by the next number::

    python -m storage.migrations revision "what changes"
"""
