"""``/v1/admin``: queue, workers, cancel / retry, the model registry, the audit chain check."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Response

from service import certification, lifecycle, registry
from service.api import presenters, schemas
from service.api.auth import Principal, require
from service.api.problems import problem_responses
from service.api.state import State
from service.db.types import utcnow
from service.errors import NotFoundError
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import rounds as rounds_repo
from service.repositories import workers as workers_repo

#: a version number as the serving routes accept it (fits the 32-bit column)
VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=problem_responses(401, 403, 503))
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/queue", summary="Queue per model: pending requests, oldest age, the running round")
def queue(state: State, _: Admin) -> list[schemas.QueueEntry]:
    now = utcnow()
    entries = []
    with state.transaction() as session:
        for model in models_repo.list_models(session):
            pending, oldest = requests_repo.queue_stats(session, model.id)
            live = rounds_repo.live_round(session, model.id)
            entries.append(
                schemas.QueueEntry(
                    model=model.name,
                    model_status=model.status,
                    pending=pending,
                    oldest_pending_at=oldest,
                    oldest_pending_age_seconds=(now - oldest).total_seconds() if oldest else None,
                    running_round=presenters.lease(session, live) if live is not None else None,
                )
            )
    return entries


@router.get("/workers", summary="Workers and their last heartbeat")
def workers(state: State, _: Admin) -> list[schemas.WorkerOut]:
    now = utcnow()
    with state.transaction() as session:
        return [
            schemas.WorkerOut.from_row(
                w, seconds_since_heartbeat=max(0.0, (now - w.last_heartbeat_at).total_seconds())
            )
            for w in workers_repo.list_workers(session)
        ]


@router.post(
    "/forget-requests/{request_id}/cancel",
    summary="Cancel a request that has not started",
    responses=problem_responses(404, 409),
)
def cancel(request_id: str, state: State, principal: Admin) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        return presenters.forget_request(
            session, lifecycle.cancel(session, request_id, actor=principal.actor)
        )


@router.post(
    "/forget-requests/{request_id}/retry",
    summary="Queue a failed request again",
    responses=problem_responses(404, 409),
)
def retry(
    request_id: str, state: State, principal: Admin, background: BackgroundTasks
) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        out = presenters.forget_request(session, lifecycle.retry(session, request_id, actor=principal.actor))
    background.add_task(state.dispatcher.wake, out.model)
    return out


@router.get("/models", summary="Registered models")
def list_models(state: State, _: Admin) -> list[schemas.ModelOut]:
    with state.transaction() as session:
        return [presenters.model(session, m) for m in models_repo.list_models(session)]


@router.get(
    "/models/{name}", summary="One model, its subjects and versions", responses=problem_responses(404)
)
def show_model(name: str, state: State, _: Admin) -> schemas.ModelDetail:
    with state.transaction() as session:
        model = models_repo.get_model(session, name)
        if model is None:
            raise NotFoundError(f"model {name!r} is not registered")
        return presenters.model_detail(session, model)


@router.post(
    "/models/{name}/versions/{version}/certify",
    status_code=202,
    summary="Certify a published version: retrain the reference off the request path and compare",
    responses=problem_responses(404, 409),
)
def certify_version(
    name: str, version: str, state: State, principal: Admin, background: BackgroundTasks
) -> schemas.CertificationOut:
    # a version is a positive integer that fits the column; anything else names no version (404)
    number = int(version) if VERSION_NUMBER.fullmatch(version) else None
    if number is None:
        raise NotFoundError(f"model {name!r} has no version {version!r}")
    with state.transaction() as session:
        row, _ = certification.request_certification(session, name, number, actor=principal.actor)
        out = presenters.certification(row, model=name, version=number)
    background.add_task(state.dispatcher.certify, out.id)  # after the commit, ids only
    return out


@router.post(
    "/models",
    status_code=201,
    summary="Register a model for a workload; a worker prepares it (dataset, base, v1)",
    responses=problem_responses(409, 413),
)
def register_model(
    body: schemas.ModelIn, state: State, _: Admin, response: Response, background: BackgroundTasks
) -> schemas.ModelOut:
    with state.transaction() as session:
        model = registry.register(
            session,
            body.name,
            workload=body.workload,
            method=body.method,
            method_config=body.method_config,
            settings=body.settings,
        )
        out = presenters.model(session, model)
    background.add_task(state.dispatcher.prepare, out.name)
    response.headers["Location"] = f"/v1/admin/models/{out.name}"
    return out


@router.get("/audit/verify", summary="Recompute the event hash chain; names the first broken event")
def verify_audit_chain(state: State, _: Admin) -> schemas.AuditReport:
    with state.transaction() as session:
        report = events_repo.verify_chain(session)
    broken = None
    if report.first_broken_event_id is not None:
        broken = schemas.BrokenEvent(
            event_id=report.first_broken_event_id,
            request_id=report.first_broken_request_id or "",
            reason=report.reason or "",
        )
    return schemas.AuditReport(
        ok=report.ok, checked_events=report.checked, head_hash=report.head_hash, first_broken=broken
    )
