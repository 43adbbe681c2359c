"""jobs.client_key: the submission's Idempotency-Key, unique per producer

Revision ID: 0002_client_key
Revises: 0001_service
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = '0002_client_key'
down_revision = '0001_service'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_key', sa.String(length=200), nullable=True))
        batch_op.create_index('ix_jobs_producer_client_key', ['producer_id', 'client_key'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_producer_client_key')
        batch_op.drop_column('client_key')
