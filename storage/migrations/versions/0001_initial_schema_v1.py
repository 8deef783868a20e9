"""Initial schema (v1): the ledger as it was when migrations came in.

Revision ID: 0001
Revises: 
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def _missing(table: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(table)


def upgrade() -> None:
    # the v1 tables; a ledger from before migrations (v1, created by create_all) may lack those added late in v1,
    # so each is created only if it is missing
    if _missing('association_rejections'):
        op.create_table('association_rejections',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('calling_aet', sa.String(length=16), nullable=False),
        sa.Column('called_aet', sa.String(length=16), nullable=False),
        sa.Column('peer', sa.String(length=64), nullable=False),
        sa.Column('result', sa.String(length=32), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('association_rejections', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_association_rejections_at'), ['at'], unique=False)

    if _missing('meta'):
        op.create_table('meta',
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('value', sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint('key')
        )

    if _missing('notes'):
        op.create_table('notes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('calling_aet', sa.String(length=16), nullable=False),
        sa.Column('series_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('notes', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_notes_at'), ['at'], unique=False)

    if _missing('rejections'):
        op.create_table('rejections',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('calling_aet', sa.String(length=16), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=128), nullable=True),
        sa.Column('sop_class_uid', sa.String(length=128), nullable=True),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('rejections', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_rejections_at'), ['at'], unique=False)

    if _missing('series'):
        op.create_table('series',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('series_uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('generation', sa.Integer(), nullable=False),
        sa.Column('instances', sa.Integer(), nullable=False),
        sa.Column('calling_aet', sa.String(length=16), nullable=False),
        sa.Column('modality', sa.String(length=16), nullable=True),
        sa.Column('description', sa.String(length=128), nullable=True),
        sa.Column('classification', sa.String(length=16), nullable=True),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('first_received_at', sa.DateTime(), nullable=False),
        sa.Column('last_received_at', sa.DateTime(), nullable=False),
        sa.Column('release_seen_at', sa.DateTime(), nullable=True),
        sa.Column('completed_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('series_uid')
        )
        with op.batch_alter_table('series', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_series_last_received_at'), ['last_received_at'], unique=False)
            batch_op.create_index(batch_op.f('ix_series_state'), ['state'], unique=False)
            batch_op.create_index(batch_op.f('ix_series_study_uid'), ['study_uid'], unique=False)

    if _missing('instances'):
        op.create_table('instances',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_id', sa.Integer(), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
        sa.Column('path', sa.String(length=256), nullable=False),
        sa.Column('size_bytes', sa.Integer(), nullable=False),
        sa.Column('calling_aet', sa.String(length=16), nullable=False),
        sa.Column('received_at', sa.DateTime(), nullable=False),
        sa.Column('attrs', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('sop_instance_uid')
        )
        with op.batch_alter_table('instances', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_instances_series_id'), ['series_id'], unique=False)

    if _missing('jobs'):
        op.create_table('jobs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('series_id', sa.Integer(), nullable=False),
        sa.Column('source_series_uid', sa.String(length=64), nullable=False),
        sa.Column('generation', sa.Integer(), nullable=False),
        sa.Column('direction', sa.String(length=16), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('output_series_uid', sa.String(length=64), nullable=True),
        sa.Column('output_dir', sa.String(length=256), nullable=True),
        sa.Column('output_instances', sa.Integer(), nullable=False),
        sa.Column('model_identity', sa.String(length=128), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('runs', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=64), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
        sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('timings', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['series_id'], ['series.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('jobs', schema=None) as batch_op:
            batch_op.create_index('ix_jobs_claim', ['state', 'next_attempt_at'], unique=False)
            batch_op.create_index(batch_op.f('ix_jobs_series_id'), ['series_id'], unique=False)
            batch_op.create_index(batch_op.f('ix_jobs_source_series_uid'), ['source_series_uid'], unique=False)
            batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)

    if _missing('deliveries'):
        op.create_table('deliveries',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('destination', sa.String(length=128), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('status', sa.Integer(), nullable=True),
        sa.Column('stored', sa.Boolean(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'destination', 'sop_instance_uid')
        )
        with op.batch_alter_table('deliveries', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_deliveries_job_id'), ['job_id'], unique=False)

    if _missing('job_runs'):
        op.create_table('job_runs',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(), nullable=True),
        sa.Column('finished_at', sa.DateTime(), nullable=True),
        sa.Column('timings', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('job_runs', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_job_runs_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    raise NotImplementedError("the ledger is migrated forwards only; restore a backup to go back")
