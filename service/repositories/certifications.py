"""Certifications of adapter versions (retrain-based checks run off the request path)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import LIVE_CERTIFICATION_STATUSES, Certification


def create(
    session: Session, *, model_id: int, version_id: int, trigger: str, requested_by: str
) -> Certification:
    row = Certification(
        model_id=model_id,
        version_id=version_id,
        status="requested",
        trigger=trigger,
        requested_by=requested_by,
    )
    session.add(row)
    session.flush()
    return row


def get(session: Session, certification_id: int) -> Certification | None:
    return session.get(Certification, certification_id)


def live_for_version(session: Session, version_id: int) -> Certification | None:
    """The version's certification that is requested or running (at most one: partial unique index)."""
    return session.scalar(
        select(Certification).where(
            Certification.version_id == version_id, Certification.status.in_(LIVE_CERTIFICATION_STATUSES)
        )
    )


def latest_by_version(session: Session, version_ids: Sequence[int]) -> dict[int, Certification]:
    """``{version id: its most recent certification}`` in one query."""
    if not version_ids:
        return {}
    rows = session.scalars(
        select(Certification).where(Certification.version_id.in_(set(version_ids))).order_by(Certification.id)
    )
    return {row.version_id: row for row in rows}  # later ids overwrite earlier ones


def requested_ids(
    session: Session, *, model_id: int | None = None, before: datetime | None = None
) -> list[int]:
    """Ids of certifications waiting for a worker (of one model; requested before ``before``)."""
    stmt = select(Certification.id).where(Certification.status == "requested").order_by(Certification.id)
    if model_id is not None:
        stmt = stmt.where(Certification.model_id == model_id)
    if before is not None:
        stmt = stmt.where(Certification.requested_at <= before)
    return list(session.scalars(stmt))


def start(session: Session, certification_id: int, *, at: datetime) -> bool:
    """``requested`` → ``running`` (attempts + 1). False when it is not ``requested`` (a duplicate
    message, or another worker took it)."""
    result = session.execute(
        update(Certification)
        .where(Certification.id == certification_id, Certification.status == "requested")
        .values(status="running", started_at=at, attempts=Certification.attempts + 1)
    )
    return bool(getattr(result, "rowcount", 0))


def finish(
    session: Session,
    row: Certification,
    *,
    status: str,
    at: datetime,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    row.status = status
    row.finished_at = at
    row.result = result
    row.error = error
    session.flush()


def requeue_running(session: Session, *, started_before: datetime) -> list[int]:
    """``running`` certifications started before ``started_before`` (their worker died) →
    ``requested``, so that the sweeper sends them again."""
    ids = list(
        session.scalars(
            select(Certification.id).where(
                Certification.status == "running", Certification.started_at < started_before
            )
        )
    )
    if ids:
        session.execute(update(Certification).where(Certification.id.in_(ids)).values(status="requested"))
    return ids
