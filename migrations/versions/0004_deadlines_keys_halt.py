"""calendar-month deadlines and extensions, API key use and rotation, halted models

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("extended_months", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_forget_requests_due_at"), ["due_at"], unique=False)
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("halted_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("halted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("halted_at")
        batch_op.drop_column("halted_reason")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("rotated_at")
        batch_op.drop_column("last_used_at")
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forget_requests_due_at"))
        batch_op.drop_column("extended_months")
