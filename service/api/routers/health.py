"""``/healthz`` (the process answers) and ``/readyz`` (database reachable; broker state reported)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api import schemas
from service.api.problems import problem_responses
from service.api.state import State
from service.errors import ServiceError

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


class NotReadyError(ServiceError):
    status, title, slug = 503, "Service unavailable", "not-ready"


@router.get("/healthz", summary="The process is up")
def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get(
    "/readyz",
    summary="The database answers; the broker's state is reported",
    responses=problem_responses(503),
)
def readyz(state: State) -> schemas.Readiness:
    broker = state.dispatcher.broker_state()
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError:
        log.warning("readiness: database unreachable", exc_info=True)
        raise NotReadyError("the database is unreachable", database="unreachable", broker=broker) from None
    return schemas.Readiness(status="ready", database="ok", broker=broker)
