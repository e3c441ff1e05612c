"""``/healthz`` (the process answers) and ``/readyz`` (database reachable; broker state reported).

Both run on the event loop, not in the thread pool that request handlers share, and ``/readyz``
checks the database over its own connection (not the request pool) in its own threads, each step
bounded by ``LETHE_HEALTH_TIMEOUT_SECONDS``: health answers even while every request is stuck.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter
from sqlalchemy import Engine, text

from service.api import schemas
from service.api.problems import problem_responses
from service.api.state import State
from service.dispatch import BrokerState
from service.errors import ServiceError

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)
#: Threads of the probes only (a hung probe occupies one; the timeout answers regardless).
_PROBES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lethe-probe")


class NotReadyError(ServiceError):
    status, title, slug = 503, "Service unavailable", "not-ready"


@router.get("/healthz", summary="The process is up")
async def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/readyz",
    summary="The database answers; the broker's state is reported",
    responses=problem_responses(503),
)
async def readyz(state: State) -> schemas.Readiness:
    loop = asyncio.get_running_loop()
    timeout = state.settings.health_timeout_seconds
    broker_check = loop.run_in_executor(_PROBES, state.dispatcher.broker_state)
    database_check = loop.run_in_executor(_PROBES, _select_one, state.probe_engine or state.engine)
    checks: list[asyncio.Future[Any]] = [broker_check, database_check]
    done, _ = await asyncio.wait(checks, timeout=timeout)
    broker: BrokerState = broker_check.result() if broker_check in done else "unreachable"
    error = (
        database_check.exception() if database_check in done else TimeoutError(f"no answer in {timeout} s")
    )
    if error is not None:  # unreachable, refused, or slower than the timeout
        log.warning("readiness: database unreachable (%s: %s)", type(error).__name__, error)
        raise NotReadyError("the database is unreachable", database="unreachable", broker=broker)
    return schemas.Readiness(status="ready", database="ok", broker=broker)
