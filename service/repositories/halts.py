"""A model halted because a worker found its database rows and its artifacts disagree."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import AdapterVersion, Model, Round
from service.db.types import utcnow


def set_halted(session: Session, model: Model, reason: str | None) -> bool:
    """Halt the model with ``reason`` (None: resume it); whether anything changed."""
    if model.halted_reason == reason:
        return False
    model.halted_reason = reason
    model.halted_at = utcnow() if reason is not None else None
    session.flush()
    return True


def round_ids(session: Session, model_id: int) -> set[int]:
    return set(session.scalars(select(Round.id).where(Round.model_id == model_id)))


def withdraw_superseded(session: Session, model_id: int) -> list[int]:
    """Withdraw active versions older than the newest version that completed a forget request:
    each was trained before that erasure (a restore of mismatched parts can leave them active)."""
    versions = list(
        session.scalars(
            select(AdapterVersion).where(AdapterVersion.model_id == model_id).order_by(AdapterVersion.version)
        )
    )
    erasing = [v.version for v in versions if v.round_id is not None]
    if not erasing:
        return []
    newest = max(erasing)
    stale: Sequence[AdapterVersion] = [v for v in versions if v.status == "active" and v.version < newest]
    now = utcnow()
    for v in stale:
        v.status = "withdrawn"
        v.withdrawn_at = now
    session.flush()
    return [v.version for v in stale]
