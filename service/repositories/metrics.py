"""Set-based reads behind the Prometheus collector: one grouped query per table, no rows loaded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import AdapterVersion, Certification, ForgetRequest, Model, Round, Worker
from service.deadlines import OPEN_STATUSES


@dataclass(frozen=True)
class RequestGroup:
    model: str
    status: str
    count: int
    oldest_received_at: datetime | None
    attempts: int
    crashes: int


def model_names(session: Session) -> list[str]:
    return list(session.scalars(select(Model.name).order_by(Model.name)))


def request_groups(session: Session) -> list[RequestGroup]:
    """Requests per model and status, with the oldest arrival and the summed attempts / crashes."""
    stmt = (
        select(
            Model.name,
            ForgetRequest.status,
            func.count(),
            func.min(ForgetRequest.received_at),
            func.coalesce(func.sum(ForgetRequest.attempts), 0),
            func.coalesce(func.sum(ForgetRequest.crashes), 0),
        )
        .select_from(ForgetRequest)
        .join(Model, Model.id == ForgetRequest.model_id)
        .group_by(Model.name, ForgetRequest.status)
    )
    return [
        RequestGroup(m, s, int(n), oldest, int(a), int(c)) for m, s, n, oldest, a, c in session.execute(stmt)
    ]


def overdue_counts(session: Session, *, now: datetime) -> dict[str, int]:
    """Open requests (not completed, cancelled or rejected) past their deadline, per model."""
    stmt = (
        select(Model.name, func.count())
        .select_from(ForgetRequest)
        .join(Model, Model.id == ForgetRequest.model_id)
        .where(ForgetRequest.due_at < now, ForgetRequest.status.in_(OPEN_STATUSES))
        .group_by(Model.name)
    )
    return {name: int(n) for name, n in session.execute(stmt)}


def round_counts(session: Session) -> list[tuple[str, str, int, int]]:
    """(model, status, rounds, extra attempts): a round's attempts beyond the first are crashes."""
    stmt = (
        select(Model.name, Round.status, func.count(), func.coalesce(func.sum(Round.attempts - 1), 0))
        .select_from(Round)
        .join(Model, Model.id == Round.model_id)
        .group_by(Model.name, Round.status)
    )
    return [(m, s, int(n), int(c)) for m, s, n, c in session.execute(stmt)]


def version_counts(session: Session) -> list[tuple[str, str, int]]:
    stmt = (
        select(Model.name, AdapterVersion.status, func.count())
        .select_from(AdapterVersion)
        .join(Model, Model.id == AdapterVersion.model_id)
        .group_by(Model.name, AdapterVersion.status)
    )
    return [(m, s, int(n)) for m, s, n in session.execute(stmt)]


def certification_counts(session: Session) -> list[tuple[str, str, int]]:
    stmt = (
        select(Model.name, Certification.status, func.count())
        .select_from(Certification)
        .join(Model, Model.id == Certification.model_id)
        .group_by(Model.name, Certification.status)
    )
    return [(m, s, int(n)) for m, s, n in session.execute(stmt)]


def worker_heartbeats(session: Session) -> list[tuple[str, str, datetime]]:
    return [
        (w, s, at) for w, s, at in session.execute(select(Worker.id, Worker.state, Worker.last_heartbeat_at))
    ]
