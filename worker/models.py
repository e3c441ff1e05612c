"""Operator operations on models from the worker side (``lethe models``, ``lethe demo``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service import registry
from service.db.migrate import upgrade
from service.db.models import MODEL_NAME_PATTERN
from service.db.session import create_db_engine, make_session_factory, transaction
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from worker.config import WorkerSettings

MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(settings.resolved_database_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def migrate(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    upgrade(settings.resolved_database_url)


def create_model(
    name: str,
    *,
    workload: str,
    workload_options: dict[str, Any] | None = None,
    method: str | None = None,
    method_config: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    app_settings: Settings | None = None,
) -> bool:
    """Register a model (status ``preparing``); False if it exists (and has not failed).

    Runs the migrations first. ``method`` None: the API's default (``service.registry``).
    ``workload_options``: the workload's constructor arguments (checked as the API checks them;
    the preparation builds the workload with them).
    """
    if not MODEL_NAME.match(name):
        raise ValueError(f"invalid model name {name!r} (want {MODEL_NAME.pattern})")
    from worker.unlearning.workload import available_workloads

    if workload not in available_workloads():
        raise ValueError(f"unknown workload {workload!r}; available: {', '.join(available_workloads())}")
    app_settings = app_settings or Settings()
    migrate(app_settings)
    with _sessions(app_settings) as factory, transaction(factory) as session:
        existing = models_repo.get_model(session, name)
        if existing is not None and existing.status != "failed":
            return False
        # the API's registration (default method, re-registration of a failed model)
        registry.register(
            session,
            name,
            workload=workload,
            options=dict(workload_options or {}),
            method=method,
            method_config=dict(method_config or {}),
            settings=dict(settings or {}),
        )
    return True


def prepare_here(name: str, *, app_settings: Settings | None = None) -> int | None:
    """Train v1 in this process (the pipeline's ``prepare_model``); the version, None if ready."""
    from worker.context import WorkerContext
    from worker.preparation import prepare_model

    app_settings = app_settings or Settings()
    ctx = WorkerContext.create(app_settings, WorkerSettings(), worker_id="cli")
    try:
        published = prepare_model(ctx, name, time_limits=False)
    finally:
        ctx.close()
    return published.version if published is not None else None


def queue_prepare(name: str, *, app_settings: Settings | None = None) -> None:
    from worker.celery_app import TASK_PREPARE, celery_config

    app_settings = app_settings or Settings()
    client = Celery("lethe-cli", set_as_current=False)
    client.conf.update(celery_config(app_settings, WorkerSettings()))
    client.send_task(TASK_PREPARE, args=[name])


def list_models(app_settings: Settings | None = None) -> list[dict[str, Any]]:
    app_settings = app_settings or Settings()
    rows: list[dict[str, Any]] = []
    with _sessions(app_settings) as factory, transaction(factory) as session:
        for model in models_repo.list_models(session):
            versions = versions_repo.list_versions(session, model.id)
            latest = versions_repo.latest_active(session, model.id)
            rows.append(
                {
                    "name": model.name,
                    "workload": model.workload,
                    "workload_options": dict(model.workload_options),
                    "method": model.method,
                    "status": model.status,
                    "latest_version": latest.version if latest else None,
                    "versions": [f"v{v.version}:{v.status}" for v in versions],
                }
            )
    return rows
