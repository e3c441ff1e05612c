"""The FastAPI application factory (``uvicorn --factory service.api.app:create_app``).

Nothing is built at import time: settings, the engine and the dispatcher are created by
:func:`create_app` / the lifespan. This module never imports torch, peft or ``worker``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api import problems
from service.api.auth import document_scopes
from service.api.limits import BodySizeLimit
from service.api.not_modified import NotModifiedShortcut
from service.api.request_id import RequestId
from service.api.routers import admin, forget_requests, health, metrics, serving, webhooks
from service.api.state import AppState
from service.api.throttle import AuthFailures
from service.db.session import create_probe_engine, make_session_factory
from service.dispatch import Dispatcher
from service.sequencer import ChainSequencer
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Lethe turns right-to-be-forgotten requests into verified, versioned model updates.

Authenticate with `Authorization: Bearer <key>` (scopes `submit`, `admin`, `serve`; `admin` may
do everything). Every error is `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = settings.create_engine()
        probe = create_probe_engine(
            settings.resolved_database_url, timeout_seconds=settings.health_timeout_seconds
        )
        dispatcher = Dispatcher(settings.broker_url, timeout_seconds=settings.dispatch_timeout_seconds)
        state = AppState(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            dispatcher=dispatcher,
            auth_failures=AuthFailures(
                limit=settings.auth_failure_limit, window_seconds=settings.auth_failure_window_seconds
            ),
            probe_engine=probe,
        )
        state.sequencer = ChainSequencer(
            state.sessions, interval_seconds=settings.chain_sequence_interval_seconds
        )
        state.sequencer.start()
        app.state.lethe = state
        # No sweeper here: the workers' heartbeat (worker/liveness.py) is the only one; it re-sends
        # what the dispatcher could not send (broker down at submission).
        try:
            yield
        finally:
            state.sequencer.close()
            dispatcher.close()
            engine.dispose()
            probe.dispose()

    app = FastAPI(
        title="Lethe",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            app.openapi_schema = document_scopes(problems.document_problems(schema))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    problems.install(app)
    app.add_middleware(NotModifiedShortcut)  # innermost of ours: 304s keep their X-Request-ID
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)  # outermost: even a 413's log lines carry the id
    for router in (
        forget_requests.router,
        webhooks.router,
        admin.router,
        serving.router,
        health.router,
        metrics.router,
    ):
        app.include_router(router)
    return app
