"""``/v1/admin``: queue, workers, cancel / retry, the model registry, the audit chain check."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Response
from sqlalchemy.orm import Session

from service import certification, deadlines, lifecycle, methods, registry
from service.api import cursors, presenters, schemas
from service.api.auth import Principal, require
from service.api.cursors import MAX_SEQ
from service.api.problems import problem_responses
from service.api.state import State
from service.db.models import ApiKey, Model
from service.db.types import utcnow
from service.errors import ConflictError, NotFoundError, UnprocessableError
from service.repositories import events as events_repo
from service.repositories import keys as keys_repo
from service.repositories import model_events as model_events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import rounds as rounds_repo
from service.repositories import workers as workers_repo

#: a version number as the serving routes accept it (fits the 32-bit column)
VERSION_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
#: what a client or sample id can be (no control characters): others name none
_STORED_ID = re.compile(r"[^\x00-\x1f\x7f]{1,200}")

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=problem_responses(401, 403, 503))
Admin = Annotated[Principal, Depends(require("admin"))]


@router.get("/queue", summary="Queue per model: pending requests, oldest age, the running round")
def queue(state: State, _: Admin) -> list[schemas.QueueEntry]:
    now = utcnow()
    entries = []
    with state.transaction() as session:
        for model in models_repo.list_models(session):
            pending, oldest = requests_repo.queue_stats(session, model.id)
            overdue, next_due = requests_repo.deadline_stats(session, model.id, deadlines.OPEN_STATUSES, now)
            live = rounds_repo.live_round(session, model.id)
            entries.append(
                schemas.QueueEntry(
                    model=model.name,
                    model_status=model.status,
                    pending=pending,
                    oldest_pending_at=oldest,
                    oldest_pending_age_seconds=(now - oldest).total_seconds() if oldest else None,
                    running_round=presenters.lease(session, live) if live is not None else None,
                    overdue=overdue,
                    next_due_at=next_due,
                    halted_reason=model.halted_reason,
                )
            )
    return entries


@router.get(
    "/queue/requests",
    summary="Open requests (failed ones too) by deadline, earliest first; `overdue=true`: past it",
    responses=problem_responses(400, 404),
)
def queue_by_deadline(
    state: State,
    _: Admin,
    overdue: Annotated[bool, Query(description="Only requests past their deadline.")] = False,
    model: Annotated[schemas.ModelName | None, Query(description="Only this model.")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="From `next_cursor`.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.ForgetRequestPage:
    listing = cursors.Listing("due", state.cursor_key(), (overdue, model))
    after = None
    if cursor is not None:
        due, seq = listing.decode(cursor, fields=2)
        after = (cursors.moment(due), cursors.number(seq))
    with state.transaction() as session:
        model_id = models_repo.model_id_filter(session, model)
        rows = requests_repo.by_deadline(
            session,
            statuses=deadlines.OPEN_STATUSES,
            model_id=model_id,
            due_before=utcnow() if overdue else None,
            after=after,
            limit=limit + 1,
        )
        items = presenters.forget_requests(session, rows[:limit])
    last = rows[limit - 1] if len(rows) > limit else None
    return schemas.ForgetRequestPage(
        items=items, next_cursor=listing.encode(last.due_at.isoformat(), last.seq) if last else None
    )


@router.post(
    "/forget-requests/{request_id}/extend",
    summary="Extend an open request's deadline (GDPR Art. 12(3): at most two further months), with a reason",
    responses=problem_responses(404, 409),
)
def extend_deadline(
    request_id: schemas.PathId, body: schemas.DeadlineExtensionIn, state: State, principal: Admin
) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        request = lifecycle.extend_deadline(
            session, request_id, months=body.months, reason=body.reason, actor=principal.actor
        )
        return presenters.forget_request(session, request)


_KEY_ID = re.compile(r"[1-9][0-9]{0,9}")


def _key(session: Session, key_id: str, *, lock: bool = False) -> ApiKey:
    """The key with this id; 404 for anything that is not one (no query for ``abc`` or ``99999999999``)."""
    row = None
    if _KEY_ID.fullmatch(key_id) and int(key_id) <= MAX_SEQ:
        row = keys_repo.get_key(session, int(key_id), lock=lock)
    if row is None:
        raise NotFoundError(f"API key {key_id!r} does not exist")
    return row


@router.get("/keys", summary="API keys: scopes, last use, rotation and revocation (never the secrets)")
def list_keys(state: State, _: Admin) -> list[schemas.ApiKeyOut]:
    with state.transaction() as session:
        return [schemas.ApiKeyOut.from_row(k) for k in keys_repo.list_keys(session)]


@router.post("/keys", status_code=201, summary="Create an API key; the secret is in this answer only")
def create_key(body: schemas.ApiKeyIn, state: State, _: Admin) -> schemas.ApiKeyWithSecret:
    with state.transaction() as session:
        row, secret = keys_repo.create_key(session, body.scopes, name=body.name)
        return schemas.ApiKeyWithSecret.from_row(row, key=secret)


@router.post(
    "/keys/{key_id}/revoke",
    summary="Revoke an API key at once (idempotent)",
    responses=problem_responses(404),
)
def revoke_key(key_id: str, state: State, _: Admin) -> schemas.ApiKeyOut:
    with state.transaction() as session:
        return schemas.ApiKeyOut.from_row(keys_repo.revoke_key(session, _key(session, key_id, lock=True)))


@router.post(
    "/keys/{key_id}/rotate",
    summary="Give an API key a new secret (the old one stops working); same id, scopes and requests",
    responses=problem_responses(404, 409),
)
def rotate_key(key_id: str, state: State, _: Admin) -> schemas.ApiKeyWithSecret:
    with state.transaction() as session:
        row = _key(session, key_id, lock=True)
        if row.revoked_at is not None:
            raise ConflictError("a revoked API key cannot be rotated; create a new one", key_id=row.id)
        row, secret = keys_repo.rotate_key(session, row)
        return schemas.ApiKeyWithSecret.from_row(row, key=secret)


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
def cancel(request_id: schemas.PathId, state: State, principal: Admin) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        return presenters.forget_request(
            session, lifecycle.cancel(session, request_id, actor=principal.actor)
        )


@router.post(
    "/forget-requests/{request_id}/retry",
    summary="Queue a failed request again",
    responses=problem_responses(404, 409),
)
def retry(request_id: schemas.PathId, state: State, principal: Admin) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        out = presenters.forget_request(session, lifecycle.retry(session, request_id, actor=principal.actor))
    state.dispatcher.wake_soon(out.model)
    return out


@router.get("/models", summary="Registered models")
def list_models(state: State, _: Admin) -> list[schemas.ModelOut]:
    with state.transaction() as session:
        return [presenters.model(session, m) for m in models_repo.list_models(session)]


def _model(session: Session, name: str) -> Model:
    model = models_repo.get_model(session, name)
    if model is None:
        raise NotFoundError(f"model {name!r} is not registered")
    return model


@router.get(
    "/models/{name}", summary="One model, its subjects and versions", responses=problem_responses(404)
)
def show_model(name: str, state: State, _: Admin) -> schemas.ModelDetail:
    with state.transaction() as session:
        return presenters.model_detail(session, _model(session, name))


@router.get(
    "/models/{name}/clients",
    summary="A model's clients: active or forgotten, whether a request names them (paginated)",
    responses=problem_responses(400, 404),
)
def list_clients(
    name: str,
    state: State,
    _: Admin,
    status: Annotated[Literal["active", "forgotten"] | None, Query(description="Only this status.")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="From `next_cursor`.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.ClientPage:
    listing = cursors.Listing("subject", state.cursor_key(), (name, status))
    after = listing.decode_number(cursor) if cursor is not None else None
    with state.transaction() as session:
        model = _model(session, name)
        rows = models_repo.clients_page(session, model.id, status=status, after_id=after, limit=limit + 1)
        page = rows[:limit]
        requested = requests_repo.clients_with_requests(session, model.id, [r.client_id for r in page])
        items = [
            schemas.ClientOut(
                client_id=r.client_id,
                status=r.status,
                samples=r.sample_count,
                forgotten_tasks=list(r.forgotten_tasks),
                requested=r.client_id in requested,
            )
            for r in page
        ]
    next_cursor = listing.encode(page[-1].id) if len(rows) > limit else None
    return schemas.ClientPage(items=items, next_cursor=next_cursor)


@router.get(
    "/models/{name}/clients/{client_id}/samples",
    summary="A client's samples whose inputs are kept; with `task`: whose label of it is kept too",
    responses=problem_responses(400, 404, 422),
)
def list_client_samples(
    name: str,
    client_id: str,
    state: State,
    _: Admin,
    task: Annotated[
        schemas.Identifier | None, Query(description="Only samples whose label of this task is kept.")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=400, description="From `next_cursor`.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.SamplePage:
    listing = cursors.Listing("sample", state.cursor_key(), (name, client_id, task))
    after = listing.decode(cursor)[0] if cursor is not None else None
    if after is not None and not _STORED_ID.fullmatch(after):
        raise cursors.invalid()
    with state.transaction() as session:
        model = _model(session, name)
        # a name no client can have (a NUL byte, say) names none: 404 without a query
        subject = (
            models_repo.get_subject(session, model.id, client_id) if _STORED_ID.fullmatch(client_id) else None
        )
        if subject is None:
            raise NotFoundError(f"model {name!r} has no client {client_id!r}")
        if task is not None and task not in model.tasks:
            raise UnprocessableError(
                f"unknown task {task!r} for model {name!r} (tasks: {model.tasks})", field="task"
            )
        rows = models_repo.kept_samples_page(
            session, model.id, client_id, task=task, after=after, limit=limit + 1
        )
        items = [
            schemas.SampleOut(
                sample_id=r.sample_id,
                purged_tasks=list(r.purged_tasks),
                forgotten_tasks=list(r.forgotten_tasks),
            )
            for r in rows[:limit]
        ]
    next_cursor = listing.encode(rows[limit - 1].sample_id) if len(rows) > limit else None
    return schemas.SamplePage(items=items, next_cursor=next_cursor)


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
    body: schemas.ModelIn, state: State, principal: Admin, response: Response
) -> schemas.ModelOut:
    with state.transaction() as session:
        model = registry.register(
            session,
            body.name,
            workload=body.workload,
            options=body.workload_options,
            method=body.method,
            method_config=body.method_config,
            settings=body.settings,
            actor=principal.actor,
        )
        out = presenters.model(session, model)
    state.dispatcher.prepare_soon(out.name)
    response.headers["Location"] = f"/v1/admin/models/{out.name}"
    return out


@router.patch(
    "/models/{name}",
    summary="Change a ready model's method or settings, from its next round on (recorded as an event)",
    responses=problem_responses(404, 409, 413),
)
def reconfigure_model(
    name: str, body: schemas.ModelUpdateIn, state: State, principal: Admin
) -> schemas.ModelOut:
    with state.transaction() as session:
        model = registry.reconfigure(
            session,
            name,
            method=body.method,
            method_config=body.method_config,
            settings=body.settings,
            actor=principal.actor,
        )
        return presenters.model(session, model)


@router.get(
    "/models/{name}/events",
    summary="A model's configuration history (registered, reconfigured)",
    responses=problem_responses(404),
)
def model_events(name: str, state: State, _: Admin) -> list[schemas.ModelEventOut]:
    with state.transaction() as session:
        model = _model(session, name)
        return [schemas.ModelEventOut.from_row(e) for e in model_events_repo.for_model(session, model.id)]


@router.get("/methods", summary="The unlearning methods and the JSON Schemas of their settings")
def list_methods(_: Admin) -> schemas.MethodCatalogue:
    return schemas.MethodCatalogue.model_validate(methods.catalogue())


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
        ok=report.ok,
        checked_events=report.checked,
        head_hash=report.head_hash,
        first_broken=broken,
        pending_events=report.pending,
    )
