"""Schema v2: ``prunes``, retention's removal records (a removal is recorded before its files go).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('prunes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_id', sa.Integer(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('what', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=16), nullable=False),
    sa.Column('files', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_id', 'generation', 'what')
    )
    with op.batch_alter_table('prunes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prunes_finished_at'), ['finished_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_prunes_series_id'), ['series_id'], unique=False)


def downgrade() -> None:
    raise NotImplementedError("the ledger is migrated forwards only; restore a backup to go back")
