"""Liveness: the worker's heartbeat row and what the sweeper asks the database (models to wake, to
prepare; models ready at worker start). The sweeper itself runs in the heartbeat thread
(``worker.tasks.Heartbeat``)."""

from __future__ import annotations

import fcntl
import logging

from service import rounds
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import models as models_repo
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def models_to_wake(ctx: WorkerContext) -> list[str]:
    with transaction(ctx.session_factory) as session:
        return rounds.models_to_wake(session)


def heartbeat(ctx: WorkerContext, *, queues: list[str], state: str) -> None:
    with transaction(ctx.session_factory) as session:
        rounds.heartbeat(session, ctx.worker_id, hostname=ctx.hostname, queues=queues, state=state)


def models_to_prepare(ctx: WorkerContext, *, min_age_seconds: float = 60.0) -> list[str]:
    """Models still ``preparing`` a while after registration whose preparation no one runs here.

    The API sends ``lethe.prepare_model`` after registering a model; when that message was lost
    (broker down) or its worker died, the sweeper sends it again. A preparation in progress on this
    host holds the model's prepare lock (a shared artifacts volume extends this across hosts).
    """
    from datetime import timedelta

    cutoff = utcnow() - timedelta(seconds=min_age_seconds)
    with transaction(ctx.session_factory) as session:
        names = [
            m.name
            for m in models_repo.list_models(session)
            if m.status == "preparing" and m.created_at <= cutoff
        ]
    idle: list[str] = []
    for name in names:
        lock_dir = ctx.artifacts(name).model_dir
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / ".prepare.lock", "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        idle.append(name)
    return idle


def ready_models(ctx: WorkerContext) -> list[str]:
    with transaction(ctx.session_factory) as session:
        return [m.name for m in models_repo.list_models(session) if m.status == "ready"]
