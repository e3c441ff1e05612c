"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('workload', sa.String(length=200), nullable=False),
    sa.Column('tasks', sa.JSON(), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('method_config', sa.JSON(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('base_location', sa.String(length=500), nullable=True),
    sa.Column('base_files', sa.JSON(), nullable=False),
    sa.Column('last_fencing_token', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('prepared_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('preparing', 'ready', 'failed')", name=op.f('ck_models_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('rounds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('method', sa.String(length=100), nullable=False),
    sa.Column('method_config', sa.JSON(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('fencing_token', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('parent_version', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'verifying', 'completed', 'failed')", name=op.f('ck_rounds_status')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_rounds_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rounds'))
    )
    op.create_index(op.f('ix_rounds_model_id'), 'rounds', ['model_id'], unique=False)
    op.create_index('uq_rounds_one_live_per_model', 'rounds', ['model_id'], unique=True, sqlite_where=sa.text("status IN ('running', 'verifying')"), postgresql_where=sa.text("status IN ('running', 'verifying')"))
    op.create_table('samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('sample_id', sa.String(length=200), nullable=False),
    sa.Column('client_id', sa.String(length=200), nullable=False),
    sa.Column('purged', sa.Boolean(), nullable=False),
    sa.Column('purged_tasks', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_samples_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_samples')),
    sa.UniqueConstraint('model_id', 'sample_id', name=op.f('uq_samples_model_id_sample_id'))
    )
    op.create_index('ix_samples_model_id_client_id', 'samples', ['model_id', 'client_id'], unique=False)
    op.create_table('adapter_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('parent_version', sa.Integer(), nullable=True),
    sa.Column('location', sa.String(length=500), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('withdrawn_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('active', 'withdrawn')", name=op.f('ck_adapter_versions_status')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_adapter_versions_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_adapter_versions_round_id_rounds')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapter_versions')),
    sa.UniqueConstraint('model_id', 'version', name=op.f('uq_adapter_versions_model_id_version'))
    )
    op.create_table('forget_requests',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('client_id', sa.String(length=200), nullable=True),
    sa.Column('sample_ids', sa.JSON(), nullable=True),
    sa.Column('tasks', sa.JSON(), nullable=False),
    sa.Column('subject_key', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('round_id', sa.Integer(), nullable=True),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.CheckConstraint("kind IN ('client', 'task')", name=op.f('ck_forget_requests_kind')),
    sa.CheckConstraint("status IN ('received', 'queued', 'running', 'verifying', 'completed', 'failed', 'cancelled', 'rejected')", name=op.f('ck_forget_requests_status')),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_forget_requests_api_key_id_api_keys')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_forget_requests_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_forget_requests_round_id_rounds')),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_forget_requests_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_forget_requests')),
    sa.UniqueConstraint('api_key_id', 'idempotency_key', name=op.f('uq_forget_requests_api_key_id_idempotency_key')),
    sa.UniqueConstraint('id', name=op.f('uq_forget_requests_id'))
    )
    op.create_index('ix_forget_requests_model_id_status_seq', 'forget_requests', ['model_id', 'status', 'seq'], unique=False)
    op.create_index('uq_forget_requests_active_subject', 'forget_requests', ['model_id', 'subject_key'], unique=True, sqlite_where=sa.text("status IN ('received', 'queued', 'running', 'verifying')"), postgresql_where=sa.text("status IN ('received', 'queued', 'running', 'verifying')"))
    op.create_table('evidence',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['forget_requests.id'], name=op.f('fk_evidence_request_id_forget_requests'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_evidence_round_id_rounds')),
    sa.ForeignKeyConstraint(['version_id'], ['adapter_versions.id'], name=op.f('fk_evidence_version_id_adapter_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evidence'))
    )
    op.create_index(op.f('ix_evidence_request_id'), 'evidence', ['request_id'], unique=False)
    op.create_table('request_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['forget_requests.id'], name=op.f('fk_request_events_request_id_forget_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_request_events')),
    sa.UniqueConstraint('hash', name=op.f('uq_request_events_hash'))
    )
    op.create_index(op.f('ix_request_events_request_id'), 'request_events', ['request_id'], unique=False)
    op.create_table('round_requests',
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.String(length=36), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['request_id'], ['forget_requests.id'], name=op.f('fk_round_requests_request_id_forget_requests')),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_round_requests_round_id_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('round_id', 'request_id', name=op.f('pk_round_requests'))
    )
    op.create_table('subjects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('client_id', sa.String(length=200), nullable=False),
    sa.Column('sample_count', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('forgotten_by_request_id', sa.String(length=36), nullable=True),
    sa.Column('forgotten_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('active', 'forgotten')", name=op.f('ck_subjects_status')),
    sa.ForeignKeyConstraint(['forgotten_by_request_id'], ['forget_requests.id'], name=op.f('fk_subjects_forgotten_by_request_id_forget_requests')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_subjects_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subjects')),
    sa.UniqueConstraint('model_id', 'client_id', name=op.f('uq_subjects_model_id_client_id'))
    )


def downgrade() -> None:
    op.drop_table('subjects')
    op.drop_table('round_requests')
    op.drop_index(op.f('ix_request_events_request_id'), table_name='request_events')
    op.drop_table('request_events')
    op.drop_index(op.f('ix_evidence_request_id'), table_name='evidence')
    op.drop_table('evidence')
    op.drop_index('uq_forget_requests_active_subject', table_name='forget_requests', sqlite_where=sa.text("status IN ('received', 'queued', 'running', 'verifying')"), postgresql_where=sa.text("status IN ('received', 'queued', 'running', 'verifying')"))
    op.drop_index('ix_forget_requests_model_id_status_seq', table_name='forget_requests')
    op.drop_table('forget_requests')
    op.drop_table('adapter_versions')
    op.drop_index('ix_samples_model_id_client_id', table_name='samples')
    op.drop_table('samples')
    op.drop_index('uq_rounds_one_live_per_model', table_name='rounds', sqlite_where=sa.text("status IN ('running', 'verifying')"), postgresql_where=sa.text("status IN ('running', 'verifying')"))
    op.drop_index(op.f('ix_rounds_model_id'), table_name='rounds')
    op.drop_table('rounds')
    op.drop_table('workers')
    op.drop_table('models')
    op.drop_table('api_keys')
