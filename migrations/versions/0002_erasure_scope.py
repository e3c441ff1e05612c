"""erasure scope per task, merged submissions

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- ``subjects.forgotten_tasks`` / ``samples.forgotten_tasks``: what was forgotten, per task, so that a
  partial erasure does not mark a whole client forgotten and a covered request answers 409;
- ``forget_requests.merged_into`` and status ``merged``: every submission is its own request; one for
  a subject with a pending request follows that request.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATUSES = (
    "status IN ('received', 'queued', 'running', 'verifying', 'completed', 'failed', 'cancelled', 'rejected')"
)
_NEW_STATUSES = "status IN ('received', 'queued', 'running', 'verifying', 'completed', 'failed', 'cancelled', 'rejected', 'merged')"
_ACTIVE = sa.text("status IN ('received', 'queued', 'running', 'verifying')")


def _status_check(check: str) -> None:
    with op.batch_alter_table("forget_requests") as batch_op:
        batch_op.drop_constraint(op.f("ck_forget_requests_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_forget_requests_status"), sa.text(check))


def upgrade() -> None:
    with op.batch_alter_table("subjects") as batch_op:
        batch_op.add_column(sa.Column("forgotten_tasks", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("samples") as batch_op:
        batch_op.add_column(sa.Column("forgotten_tasks", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("forget_requests") as batch_op:
        batch_op.add_column(sa.Column("merged_into", sa.String(length=36), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_forget_requests_merged_into_forget_requests"), "forget_requests", ["merged_into"], ["id"]
        )
    op.create_index(op.f("ix_forget_requests_merged_into"), "forget_requests", ["merged_into"], unique=False)
    _status_check(_NEW_STATUSES)
    # A batch rebuild on SQLite may drop the partial unique index: make sure it is there as it was.
    _ensure_active_subject_index()
    _backfill_forgotten_scope()


def downgrade() -> None:
    op.execute("DELETE FROM forget_requests WHERE status = 'merged'")
    _status_check(_OLD_STATUSES)
    op.drop_index(op.f("ix_forget_requests_merged_into"), table_name="forget_requests")
    with op.batch_alter_table("forget_requests") as batch_op:
        batch_op.drop_constraint(op.f("fk_forget_requests_merged_into_forget_requests"), type_="foreignkey")
        batch_op.drop_column("merged_into")
    _ensure_active_subject_index()
    with op.batch_alter_table("samples") as batch_op:
        batch_op.drop_column("forgotten_tasks")
    with op.batch_alter_table("subjects") as batch_op:
        batch_op.drop_column("forgotten_tasks")


def _ensure_active_subject_index() -> None:
    names = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("forget_requests")}
    if "uq_forget_requests_active_subject" in names:
        op.drop_index("uq_forget_requests_active_subject", table_name="forget_requests")
    op.create_index(
        "uq_forget_requests_active_subject",
        "forget_requests",
        ["model_id", "subject_key"],
        unique=True,
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )


def _backfill_forgotten_scope() -> None:
    """Re-derive what was forgotten from the completed requests: a client is forgotten in full only
    by a client request for every task (before, any client request marked it so), its other client
    requests forget it for their tasks; task requests forget their samples for their tasks."""
    bind = op.get_bind()
    meta = sa.MetaData()
    models = sa.Table("models", meta, sa.Column("id", sa.Integer), sa.Column("tasks", sa.JSON))
    subjects = sa.Table(
        "subjects",
        meta,
        sa.Column("id", sa.Integer),
        sa.Column("model_id", sa.Integer),
        sa.Column("client_id", sa.String),
        sa.Column("status", sa.String),
        sa.Column("forgotten_by_request_id", sa.String),
        sa.Column("forgotten_at", sa.DateTime(timezone=True)),
        sa.Column("forgotten_tasks", sa.JSON),
    )
    samples = sa.Table(
        "samples",
        meta,
        sa.Column("id", sa.Integer),
        sa.Column("model_id", sa.Integer),
        sa.Column("sample_id", sa.String),
        sa.Column("forgotten_tasks", sa.JSON),
    )
    requests = sa.Table(
        "forget_requests",
        meta,
        sa.Column("seq", sa.Integer),
        sa.Column("id", sa.String),
        sa.Column("model_id", sa.Integer),
        sa.Column("kind", sa.String),
        sa.Column("client_id", sa.String),
        sa.Column("sample_ids", sa.JSON),
        sa.Column("tasks", sa.JSON),
        sa.Column("status", sa.String),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
    )
    model_tasks = {
        row.id: set(row.tasks or []) for row in bind.execute(sa.select(models.c.id, models.c.tasks))
    }
    client_tasks: dict[tuple[int, str], set[str]] = {}
    client_full: dict[tuple[int, str], tuple[str, object]] = {}
    sample_tasks: dict[tuple[int, str], set[str]] = {}
    done = bind.execute(sa.select(requests).where(requests.c.status == "completed").order_by(requests.c.seq))
    for req in done:
        tasks = set(req.tasks or [])
        if req.kind == "client" and req.client_id is not None:
            key = (req.model_id, req.client_id)
            client_tasks.setdefault(key, set()).update(tasks)
            if tasks >= model_tasks.get(req.model_id, set()):
                client_full.setdefault(key, (req.id, req.completed_at))
        else:
            for sample_id in req.sample_ids or []:
                sample_tasks.setdefault((req.model_id, sample_id), set()).update(tasks)
    for subject in bind.execute(sa.select(subjects)).all():
        key = (subject.model_id, subject.client_id)
        if key not in client_tasks:
            continue
        full = client_full.get(key)
        bind.execute(
            sa.update(subjects)
            .where(subjects.c.id == subject.id)
            .values(
                forgotten_tasks=sorted(client_tasks[key]),
                status="active" if full is None else "forgotten",
                forgotten_by_request_id=None if full is None else full[0],
                forgotten_at=None if full is None else full[1],
            )
        )
    for (model_id, sample_id), tasks in sample_tasks.items():
        bind.execute(
            sa.update(samples)
            .where(samples.c.model_id == model_id, samples.c.sample_id == sample_id)
            .values(forgotten_tasks=sorted(tasks))
        )
