"""models.workload_options: the keyword arguments a registered model's workload is built with

Revision ID: 0009_workload_options
Revises: 0008_round_progress
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_workload_options"
down_revision: str | None = "0008_round_progress"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # existing models were built with the workload's defaults: {}
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("workload_options", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("workload_options")
