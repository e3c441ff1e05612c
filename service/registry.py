"""Model registration and reconfiguration on the API side (the worker prepares the model afterwards).

The method and its settings are validated against the methods' schemas (``service.methods``) both
times; each change is a model event.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import methods, workload_options
from service.db.models import Model
from service.errors import ConflictError, NotFoundError, UnprocessableError
from service.repositories import model_events
from service.repositories import models as models_repo

DEFAULT_METHOD = methods.DEFAULT_METHOD
#: Settings blocks that v1 was prepared with (the base, the adapter's shape, the training recipe
#: the retrain reference repeats): fixed once the model is prepared.
PREPARED_WITH = ("pretrain", "lora", "train")


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
    options: dict[str, Any] | None = None,
    actor: str = "system",
) -> Model:
    """A new model in status ``preparing``; a ``failed`` model may be registered again.

    ``options``: the workload's constructor arguments (``service.workload_options``); whether the
    constructor takes them is checked by the worker's preparation (it needs the workload's code)."""
    workloads = known_workloads()
    if workloads and workload not in workloads:
        raise UnprocessableError(
            f"unknown workload {workload!r}; available: {', '.join(workloads)}", field="workload"
        )
    try:
        options = workload_options.check(options or {})
    except ValueError as exc:
        raise UnprocessableError(f"workload_options: {exc}", field="workload_options") from None
    method = method or DEFAULT_METHOD
    methods.validate(method, method_config, settings)
    config = {
        "workload": workload,
        "workload_options": options,
        "method": method,
        "method_config": method_config,
        "settings": settings,
    }
    existing = models_repo.lock_model(session, name)
    if existing is not None:
        if existing.status != "failed":
            raise ConflictError(f"model {name!r} is already registered ({existing.status})", field="name")
        existing.workload = workload
        existing.workload_options = dict(options)
        existing.method = method
        existing.method_config = dict(method_config)
        existing.settings = dict(settings)
        existing.status = "preparing"
        existing.error = None
        session.flush()
        model_events.append(session, existing.id, "registered", actor=actor, detail=config)
        return existing
    try:
        with session.begin_nested():
            model = models_repo.create_model(
                session,
                name,
                workload=workload,
                workload_options=options,
                method=method,
                method_config=dict(method_config),
                settings=dict(settings),
            )
    except IntegrityError:
        raise ConflictError(f"model {name!r} is already registered", field="name") from None
    model_events.append(session, model.id, "registered", actor=actor, detail=config)
    return model


def reconfigure(
    session: Session,
    name: str,
    *,
    method: str | None,
    method_config: dict[str, Any] | None,
    settings: dict[str, Any] | None,
    actor: str,
) -> Model:
    """Replace a ready model's method, method_config and / or settings (``None``: unchanged).

    The next round claimed uses them (a round records its method and settings when claimed, so a
    running or resumed round keeps the ones it started with). An event ``reconfigured`` records
    each change; a request that changes nothing records nothing.
    """
    # a name no model can have is not looked up (PostgreSQL refuses some, e.g. with a NUL byte)
    model = models_repo.lock_model(session, name) if models_repo.is_model_name(name) else None
    if model is None:
        raise NotFoundError(f"model {name!r} is not registered")
    if model.status != "ready":
        raise ConflictError(
            f"model {name!r} is {model.status}: only a ready model can be reconfigured"
            + (" (register a failed one again)" if model.status == "failed" else ""),
        )
    new: dict[str, Any] = {
        "method": method if method is not None else model.method,
        "method_config": method_config if method_config is not None else model.method_config,
        "settings": settings if settings is not None else model.settings,
    }
    methods.validate(new["method"], new["method_config"], new["settings"])
    for block in PREPARED_WITH:
        if new["settings"].get(block) != model.settings.get(block):
            raise UnprocessableError(
                f"settings.{block} is fixed once the model is prepared (v1 was trained with it); "
                "register a new model to change it",
                field=f"settings.{block}",
            )
    old = {"method": model.method, "method_config": model.method_config, "settings": model.settings}
    changes = {key: {"from": old[key], "to": new[key]} for key in new if new[key] != old[key]}
    if not changes:
        return model
    model.method = new["method"]
    model.method_config = dict(new["method_config"])
    model.settings = dict(new["settings"])
    session.flush()
    model_events.append(session, model.id, "reconfigured", actor=actor, detail={"changes": changes})
    return model
