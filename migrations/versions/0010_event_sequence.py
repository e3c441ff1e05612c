"""request_events.seq: the chain position, assigned by the sequencer (pending events: NULL)

Submissions write their events pending (no chain lock on the POST path); the sequencer links them
into the chain shortly after. Every existing event is chained, and in id order.

Revision ID: 0010_event_sequence
Revises: 0009_workload_options
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_event_sequence"
down_revision: str | None = "0009_workload_options"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
    # the chain so far was appended under one lock, head read by id: its order is the id order
    op.execute("UPDATE request_events SET seq = id")
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=True)
        batch_op.create_unique_constraint(batch_op.f("uq_request_events_seq"), ["seq"])
        batch_op.create_index(
            "ix_request_events_pending",
            ["id"],
            unique=False,
            sqlite_where=sa.text("seq IS NULL"),
            postgresql_where=sa.text("seq IS NULL"),
        )


def downgrade() -> None:
    # pending events cannot be expressed without seq: chain them first (any API or worker call does)
    with op.batch_alter_table("request_events", schema=None) as batch_op:
        batch_op.drop_index("ix_request_events_pending")
        batch_op.drop_constraint(batch_op.f("uq_request_events_seq"), type_="unique")
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("seq")
