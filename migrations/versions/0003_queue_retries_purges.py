"""queue: retry backoff, crash count, recorded purges

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNPURGED = "status = 'completed' AND purged_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crashes", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_forget_requests_unpurged",
            ["model_id", "seq"],
            unique=False,
            sqlite_where=sa.text(UNPURGED),
            postgresql_where=sa.text(UNPURGED),
        )


def downgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_forget_requests_unpurged", sqlite_where=sa.text(UNPURGED), postgresql_where=sa.text(UNPURGED)
        )
        batch_op.drop_column("purged_at")
        batch_op.drop_column("not_before")
        batch_op.drop_column("crashes")
