"""Rounds: the live round of a model, the requests a round covers, what the sweeper wakes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import LIVE_ROUND_STATUSES, ForgetRequest, Model, Round, RoundRequest


def live_round(session: Session, model_id: int, *, lock: bool = False) -> Round | None:
    stmt = select(Round).where(Round.model_id == model_id, Round.status.in_(LIVE_ROUND_STATUSES))
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def get_round(session: Session, round_id: int, *, lock: bool = False) -> Round | None:
    stmt = select(Round).where(Round.id == round_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def set_progress(
    session: Session, round_id: int, fencing_token: int, *, stage: str, step: int, of: int, at: datetime
) -> bool:
    """Record where the live round is; False when the round ended or was taken over (another token).

    One conditional UPDATE without a row lock: progress must not queue behind the lease renewal."""
    result = session.execute(
        update(Round)
        .where(
            Round.id == round_id,
            Round.fencing_token == fencing_token,
            Round.status.in_(LIVE_ROUND_STATUSES),
        )
        .values(progress_stage=stage, progress_step=step, progress_of=of, progress_at=at)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def rounds_by_id(session: Session, round_ids: list[int]) -> dict[int, Round]:
    if not round_ids:
        return {}
    return {r.id: r for r in session.scalars(select(Round).where(Round.id.in_(set(round_ids))))}


def covered_requests(session: Session, round_id: int, *, lock: bool = False) -> list[ForgetRequest]:
    """The requests of a round in arrival order."""
    stmt = (
        select(ForgetRequest)
        .join(RoundRequest, RoundRequest.request_id == ForgetRequest.id)
        .where(RoundRequest.round_id == round_id)
        .order_by(RoundRequest.position)
    )
    if lock:
        stmt = stmt.with_for_update(of=ForgetRequest).execution_options(populate_existing=True)
    return list(session.scalars(stmt))


def attach_requests(session: Session, round_id: int, requests: list[ForgetRequest]) -> None:
    session.add_all(
        RoundRequest(round_id=round_id, request_id=request.id, position=position)
        for position, request in enumerate(requests)
    )
    session.flush()


def models_to_wake(session: Session, *, now: datetime) -> list[str]:
    """Ready models with queued requests or an expired live round, and no live lease.

    A model whose queue holds a request waiting for its retry time (``not_before``) is not woken
    for the requests behind it (the order is strict); it is woken once that time has come.
    """
    leased = select(Round.model_id).where(Round.status.in_(LIVE_ROUND_STATUSES), Round.lease_expires_at > now)
    expired = select(Round.model_id).where(
        Round.status.in_(LIVE_ROUND_STATUSES),
        or_(Round.lease_expires_at.is_(None), Round.lease_expires_at <= now),
    )
    queued = select(ForgetRequest.model_id).where(ForgetRequest.status == "queued")
    waiting = select(ForgetRequest.model_id).where(
        ForgetRequest.status == "queued", ForgetRequest.not_before > now
    )
    stmt = (
        select(Model.name)
        .where(
            Model.status == "ready",
            or_(and_(Model.id.in_(queued), Model.id.not_in(waiting)), Model.id.in_(expired)),
            Model.id.not_in(leased),
        )
        .order_by(Model.name)
    )
    return list(session.scalars(stmt))
