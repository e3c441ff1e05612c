"""A model's configuration history (``model_events``): append and read, never update."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ModelEvent
from service.db.types import utcnow


def append(session: Session, model_id: int, type: str, *, actor: str, detail: dict[str, Any]) -> ModelEvent:
    event = ModelEvent(model_id=model_id, type=type, actor=actor, detail=detail, at=utcnow())
    session.add(event)
    session.flush()
    return event


def for_model(session: Session, model_id: int) -> list[ModelEvent]:
    return list(
        session.scalars(select(ModelEvent).where(ModelEvent.model_id == model_id).order_by(ModelEvent.id))
    )
