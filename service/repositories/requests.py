"""Forget requests: creation, look-ups, the queue order, listing with a cursor."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from service.db import copy
from service.db.models import ACTIVE_REQUEST_STATUSES, ForgetRequest, Model
from service.repositories.models import chunks

_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def new_request_id() -> str:
    return str(uuid.uuid4())


def get_request(session: Session, request_id: str, *, lock: bool = False) -> ForgetRequest | None:
    """The request with this id; None also, without a query, for an id :func:`new_request_id`
    never makes (PostgreSQL would refuse some of them, e.g. with a NUL byte)."""
    if _REQUEST_ID.fullmatch(request_id) is None:
        return None
    stmt = select(ForgetRequest).where(ForgetRequest.id == request_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def _of_key(api_key_id: int | None) -> ColumnElement[bool]:
    return (
        ForgetRequest.api_key_id.is_(None) if api_key_id is None else ForgetRequest.api_key_id == api_key_id
    )


def by_idempotency_key(session: Session, api_key_id: int | None, key: str) -> ForgetRequest | None:
    stmt = select(ForgetRequest).where(
        ForgetRequest.idempotency_key == key,
        ForgetRequest.api_key_id.is_(None) if api_key_id is None else ForgetRequest.api_key_id == api_key_id,
    )
    return session.scalar(stmt)


def by_idempotency_keys(
    session: Session, api_key_id: int | None, keys: Sequence[str]
) -> dict[str, ForgetRequest]:
    """The caller's requests with these idempotency keys, by key."""
    found: dict[str, ForgetRequest] = {}
    for chunk in chunks(keys):
        stmt = select(ForgetRequest).where(
            ForgetRequest.idempotency_key.in_(chunk),
            ForgetRequest.api_key_id.is_(None)
            if api_key_id is None
            else ForgetRequest.api_key_id == api_key_id,
        )
        found.update({r.idempotency_key: r for r in session.scalars(stmt)})
    return found


def insert_many(session: Session, rows: Sequence[ForgetRequest]) -> None:
    """Insert new request objects in one round trip (``COPY`` on PostgreSQL). They stay transient
    (not in the session): only what their constructor set is written, the server's defaults fill
    the rest."""
    columns = {c.key for c in ForgetRequest.__table__.columns}
    copy.insert_rows(
        session, ForgetRequest, [{k: v for k, v in vars(r).items() if k in columns} for r in rows]
    )


def get_requests(session: Session, request_ids: Sequence[str]) -> dict[str, ForgetRequest]:
    if not request_ids:
        return {}
    rows = session.scalars(select(ForgetRequest).where(ForgetRequest.id.in_(set(request_ids))))
    return {r.id: r for r in rows}


def active_for_subject(session: Session, model_id: int, subject_key: str) -> ForgetRequest | None:
    stmt = select(ForgetRequest).where(
        ForgetRequest.model_id == model_id,
        ForgetRequest.subject_key == subject_key,
        ForgetRequest.status.in_(ACTIVE_REQUEST_STATUSES),
    )
    return session.scalar(stmt)


def active_for_subjects(
    session: Session, model_id: int, subject_keys: Sequence[str]
) -> dict[str, ForgetRequest]:
    """The model's pending request per subject key (at most one each: a unique index)."""
    found: dict[str, ForgetRequest] = {}
    for chunk in chunks(subject_keys):
        stmt = select(ForgetRequest).where(
            ForgetRequest.model_id == model_id,
            ForgetRequest.subject_key.in_(chunk),
            ForgetRequest.status.in_(ACTIVE_REQUEST_STATUSES),
        )
        found.update({r.subject_key: r for r in session.scalars(stmt)})
    return found


def oldest_queued(
    session: Session, model_id: int, *, limit: int, after_seq: int = 0, lock: bool = False
) -> list[ForgetRequest]:
    """The model's queued requests in arrival order (locked without skipping: order is strict)."""
    stmt = (
        select(ForgetRequest)
        .where(
            ForgetRequest.model_id == model_id,
            ForgetRequest.status == "queued",
            ForgetRequest.seq > after_seq,
        )
        .order_by(ForgetRequest.seq)
        .limit(limit)
    )
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return list(session.scalars(stmt))


def list_requests(
    session: Session,
    *,
    api_key_id: int | None,
    statuses: Sequence[str] = (),
    model_id: int | None = None,
    before_seq: int | None = None,
    limit: int,
) -> list[ForgetRequest]:
    """Newest first; ``api_key_id`` restricts to one submitter (None: everyone's)."""
    stmt = select(ForgetRequest).order_by(ForgetRequest.seq.desc()).limit(limit)
    if api_key_id is not None:
        stmt = stmt.where(ForgetRequest.api_key_id == api_key_id)
    if statuses:
        # A merged request has the status of the request it follows.
        followed = aliased(ForgetRequest)
        stmt = stmt.where(
            or_(
                ForgetRequest.status.in_(statuses),
                and_(
                    ForgetRequest.status == "merged",
                    ForgetRequest.merged_into.in_(select(followed.id).where(followed.status.in_(statuses))),
                ),
            )
        )
    if model_id is not None:
        stmt = stmt.where(ForgetRequest.model_id == model_id)
    if before_seq is not None:
        stmt = stmt.where(ForgetRequest.seq < before_seq)
    return list(session.scalars(stmt))


def model_names(session: Session, model_ids: Sequence[int]) -> dict[int, str]:
    if not model_ids:
        return {}
    rows = session.execute(select(Model.id, Model.name).where(Model.id.in_(set(model_ids))))
    return {row.id: row.name for row in rows}


def queue_stats(session: Session, model_id: int) -> tuple[int, datetime | None]:
    """(queued count, oldest queued receipt time) of a model."""
    row = session.execute(
        select(func.count(), func.min(ForgetRequest.received_at)).where(
            ForgetRequest.model_id == model_id, ForgetRequest.status == "queued"
        )
    ).one()
    count, oldest = row
    return int(count), oldest


def by_deadline(
    session: Session,
    *,
    statuses: Sequence[str],
    model_id: int | None = None,
    due_before: datetime | None = None,
    after: tuple[datetime, int] | None = None,
    limit: int,
) -> list[ForgetRequest]:
    """Requests in ``statuses`` by deadline (then arrival); ``after`` is the last (due_at, seq) seen."""
    stmt = (
        select(ForgetRequest)
        .where(ForgetRequest.status.in_(statuses))
        .order_by(ForgetRequest.due_at, ForgetRequest.seq)
        .limit(limit)
    )
    if model_id is not None:
        stmt = stmt.where(ForgetRequest.model_id == model_id)
    if due_before is not None:
        stmt = stmt.where(ForgetRequest.due_at < due_before)
    if after is not None:
        due, seq = after
        stmt = stmt.where(
            or_(ForgetRequest.due_at > due, and_(ForgetRequest.due_at == due, ForgetRequest.seq > seq))
        )
    return list(session.scalars(stmt))


def deadline_stats(
    session: Session, model_id: int, statuses: Sequence[str], now: datetime
) -> tuple[int, datetime | None]:
    """(open requests past their deadline, earliest deadline of the open requests) of a model."""
    row = session.execute(
        select(func.count().filter(ForgetRequest.due_at < now), func.min(ForgetRequest.due_at)).where(
            ForgetRequest.model_id == model_id, ForgetRequest.status.in_(statuses)
        )
    ).one()
    overdue, earliest = row
    return int(overdue), earliest


def unpurged_completed(session: Session, model_id: int) -> list[ForgetRequest]:
    """Completed requests of a model whose purge is not recorded, in arrival order (partial index)."""
    stmt = (
        select(ForgetRequest)
        .where(
            ForgetRequest.model_id == model_id,
            ForgetRequest.status == "completed",
            ForgetRequest.purged_at.is_(None),
        )
        .order_by(ForgetRequest.seq)
    )
    return list(session.scalars(stmt))


def mark_purged(session: Session, request_ids: Sequence[str], *, at: datetime) -> None:
    """Record that the raw data of these (completed) requests is purged."""
    if request_ids:
        session.execute(
            update(ForgetRequest)
            .where(ForgetRequest.id.in_(list(request_ids)), ForgetRequest.purged_at.is_(None))
            .values(purged_at=at)
            .execution_options(synchronize_session=False)
        )


def completed(session: Session, model_id: int) -> list[ForgetRequest]:
    """The model's completed requests, in arrival order."""
    stmt = (
        select(ForgetRequest)
        .where(ForgetRequest.model_id == model_id, ForgetRequest.status == "completed")
        .order_by(ForgetRequest.seq)
    )
    return list(session.scalars(stmt))


def clients_with_requests(session: Session, model_id: int, client_ids: Iterable[str]) -> set[str]:
    """Those of ``client_ids`` that any request of the model names, whatever its status."""
    stmt = select(ForgetRequest.client_id).where(
        ForgetRequest.model_id == model_id, ForgetRequest.client_id.in_(list(client_ids))
    )
    return {c for c in session.scalars(stmt.distinct()) if c}
