"""certifications: retrain-based checks of published versions, off the request path

Revision ID: 0006
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LIVE = sa.text("status IN ('requested', 'running')")


def upgrade() -> None:
    op.create_table('certifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('requested_by', sa.String(length=200), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('requested', 'running', 'certified', 'flagged', 'incomplete', 'failed')", name=op.f('ck_certifications_status')),
    sa.CheckConstraint("trigger IN ('on_demand', 'sampled')", name=op.f('ck_certifications_trigger')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_certifications_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_certifications_version_id_adapter_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_certifications'))
    )
    op.create_index(op.f('ix_certifications_model_id'), 'certifications', ['model_id'], unique=False)
    op.create_index(op.f('ix_certifications_version_id'), 'certifications', ['version_id'], unique=False)
    op.create_index('uq_certifications_live_per_version', 'certifications', ['version_id'], unique=True,
                    sqlite_where=_LIVE, postgresql_where=_LIVE)


def downgrade() -> None:
    op.drop_index('uq_certifications_live_per_version', table_name='certifications',
                  sqlite_where=_LIVE, postgresql_where=_LIVE)
    op.drop_index(op.f('ix_certifications_version_id'), table_name='certifications')
    op.drop_index(op.f('ix_certifications_model_id'), table_name='certifications')
    op.drop_table('certifications')
