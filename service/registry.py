"""Model registration on the API side (the worker prepares the model afterwards)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Model
from service.errors import ConflictError, UnprocessableError
from service.repositories import models as models_repo

DEFAULT_METHOD = "default"


def known_workloads() -> list[str]:
    """Workload names declared in the ``lethe.workloads`` entry-point group (nothing is imported)."""
    return sorted({ep.name for ep in entry_points(group="lethe.workloads")})


def register(
    session: Session,
    name: str,
    *,
    workload: str,
    method: str | None,
    method_config: dict[str, Any],
    settings: dict[str, Any],
) -> Model:
    """A new model in status ``preparing``; a ``failed`` model may be registered again."""
    workloads = known_workloads()
    if workloads and workload not in workloads:
        raise UnprocessableError(
            f"unknown workload {workload!r}; available: {', '.join(workloads)}", field="workload"
        )
    existing = models_repo.lock_model(session, name)
    if existing is not None:
        if existing.status != "failed":
            raise ConflictError(f"model {name!r} is already registered ({existing.status})", field="name")
        existing.workload = workload
        existing.method = method or DEFAULT_METHOD
        existing.method_config = dict(method_config)
        existing.settings = dict(settings)
        existing.status = "preparing"
        existing.error = None
        session.flush()
        return existing
    try:
        with session.begin_nested():
            return models_repo.create_model(
                session,
                name,
                workload=workload,
                method=method or DEFAULT_METHOD,
                method_config=dict(method_config),
                settings=dict(settings),
            )
    except IntegrityError:
        raise ConflictError(f"model {name!r} is already registered", field="name") from None
