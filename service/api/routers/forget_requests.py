"""``/v1/forget-requests``: submit, read, list (a submitter sees only its own requests)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import bulk, lifecycle
from service.api import cursors, presenters, problems, schemas
from service.api.auth import Principal, require
from service.api.problems import problem_responses
from service.api.state import State
from service.db.models import ForgetRequest
from service.errors import NotFoundError, ServiceError
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo

router = APIRouter(
    prefix="/v1/forget-requests", tags=["forget requests"], responses=problem_responses(401, 403, 503)
)
Submitter = Annotated[Principal, Depends(require("submit"))]


def _sees(principal: Principal, row: ForgetRequest) -> bool:
    """A submitter sees the requests it submitted; an admin sees all."""
    return principal.is_admin or row.api_key_id == principal.key_id


def _visible(session: Session, request_id: str, principal: Principal) -> ForgetRequest:
    row = requests_repo.get_request(session, request_id)
    if row is None or not _sees(principal, row):
        raise NotFoundError(f"forget request {request_id!r} does not exist")
    return row


@router.post(
    "",
    status_code=201,
    summary="Submit a forget request",
    responses={
        200: {
            "model": schemas.ForgetRequestOut,
            "description": "The request this submission repeats (same Idempotency-Key), or the caller's "
            "own new request merged into a pending one for the same subject (it shows that one's progress)",
        },
        **problem_responses(400, 404, 409, 413),
    },
)
def create_forget_request(
    body: schemas.ForgetRequestIn,
    response: Response,
    state: State,
    principal: Submitter,
    idempotency_key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            pattern=schemas.IDEMPOTENCY_KEY_PATTERN,
            description="Required (missing or malformed: 400): 1 to 200 printable ASCII characters, "
            "scoped to the API key. The same key and body return the same request; another body: 422.",
        ),
    ],
) -> schemas.ForgetRequestOut:
    fields = body.root
    submission = _submission(body)

    def attempt(savepoint: bool) -> tuple[lifecycle.SubmitResult, schemas.ForgetRequestOut]:
        with state.transaction() as session:
            result = lifecycle.submit(
                session,
                submission,
                idempotency_key=idempotency_key,
                api_key_id=principal.key_id,
                actor=principal.actor,
                digest_key=state.digest_key() if fields.external_id is not None else None,
                savepoint=savepoint,
            )
            return result, presenters.forget_request(session, result.request, model_name=fields.model)

    try:
        result, out = attempt(savepoint=False)  # the common case: no race, no savepoint
    except IntegrityError:
        result, out = attempt(savepoint=True)  # lost a race: again, resolving it (lifecycle.submit)
    if state.sequencer is not None:
        state.sequencer.note()  # chain the committed pending events soon (not on this request's path)
    if result.created:
        state.dispatcher.wake_soon(out.model)  # after the commit; never waits on the broker
    response.status_code = 201 if result.created else 200
    response.headers["Location"] = f"/v1/forget-requests/{out.id}"
    return out


def _submission(body: schemas.ForgetRequestIn) -> lifecycle.Submission:
    fields = body.root
    return lifecycle.Submission(
        model=fields.model,
        kind=fields.kind,
        client_id=fields.client_id if isinstance(fields, schemas.ClientForgetRequestIn) else None,
        sample_ids=fields.sample_ids if isinstance(fields, schemas.TaskForgetRequestIn) else None,
        tasks=fields.tasks,
        external_id=fields.external_id,
    )


def _bulk_item(raw: Any, index: int, instance: str) -> bulk.Item | dict[str, Any]:
    """The item, or the 422 problem object of what is wrong with it."""
    if not isinstance(raw, dict):  # pydantic would name its class ("instance of BulkItemIn")
        where = f"items[{index}]"
        only = {"field": where, "message": "must be an object", "type": "model_type"}
        return problems.problem_body(
            422,
            title="Unprocessable content",
            detail=f"{where}: must be an object {{idempotency_key, request}}",
            type_=problems.TYPE_BASE + "validation",
            instance=instance,
            field=where,
            errors=[only],
        )
    try:
        envelope = schemas.BulkItemIn.model_validate(raw)
    except ValidationError as error:
        return problems.validation_problem(error.errors(), instance)
    try:
        body = schemas.ForgetRequestIn.model_validate(envelope.request)
    except ValidationError as error:
        return problems.validation_problem(error.errors(), instance, prefix="request.")
    return bulk.Item(_submission(body), envelope.idempotency_key)


@router.post(
    "/bulk",
    summary="Submit up to 1,000 forget requests, each with its own idempotency key and result",
    responses=problem_responses(400, 413),
)
def create_forget_requests_bulk(
    body: schemas.BulkForgetRequestsIn, request: Request, state: State, principal: Submitter
) -> schemas.BulkForgetRequestsOut:
    instance = request.url.path
    parsed = [_bulk_item(raw, index, instance) for index, raw in enumerate(body.items)]
    items = [p for p in parsed if isinstance(p, bulk.Item)]
    with state.transaction() as session:
        outcomes = iter(
            bulk.submit_many(
                session,
                items,
                api_key_id=principal.key_id,
                actor=principal.actor,
                digest_key=state.digest_key() if any(i.submission.external_id for i in items) else None,
            )
        )
        results: list[schemas.BulkItemOut] = []
        shown: list[tuple[int, ForgetRequest, bool]] = []
        for index, item in enumerate(parsed):
            outcome = next(outcomes) if isinstance(item, bulk.Item) else None
            if isinstance(item, dict):
                results.append(schemas.BulkItemOut(index=index, status=422, problem=item))
            elif isinstance(outcome, ServiceError):
                problem = problems.service_problem(outcome, instance)
                results.append(schemas.BulkItemOut(index=index, status=outcome.status, problem=problem))
            else:
                assert outcome is not None
                shown.append((index, outcome.request, outcome.created))
                results.append(schemas.BulkItemOut(index=index, status=201 if outcome.created else 200))
        outs = presenters.forget_requests(session, [row for _, row, _ in shown])
    for (index, _, _), out in zip(shown, outs, strict=True):
        results[index].request = out
    for model in sorted({out.model for (_, _, created), out in zip(shown, outs, strict=True) if created}):
        state.dispatcher.wake_soon(model)  # after the commit: one wake per model, never waits
    return schemas.BulkForgetRequestsOut(
        items=results,
        created=sum(r.status == 201 for r in results),
        unchanged=sum(r.status == 200 for r in results),
        failed=sum(r.status >= 400 for r in results),
    )


@router.get("", summary="List forget requests (newest first)", responses=problem_responses(400, 404))
def list_forget_requests(
    state: State,
    principal: Submitter,
    status: Annotated[schemas.RequestStatus | None, Query(description="Only this status.")] = None,
    model: Annotated[schemas.ModelName | None, Query(description="Only this model.")] = None,
    cursor: Annotated[str | None, Query(max_length=200, description="From `next_cursor`.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.ForgetRequestPage:
    listing = cursors.Listing("seq", state.cursor_key(), (status, model))
    before = listing.decode_number(cursor) if cursor is not None else None
    with state.transaction() as session:
        model_id = models_repo.model_id_filter(session, model)
        rows = requests_repo.list_requests(
            session,
            api_key_id=None if principal.is_admin else principal.key_id,
            statuses=[status] if status else [],
            model_id=model_id,
            before_seq=before,
            limit=limit + 1,
        )
        items = presenters.forget_requests(session, rows[:limit])
    next_cursor = listing.encode(rows[limit - 1].seq) if len(rows) > limit else None
    return schemas.ForgetRequestPage(items=items, next_cursor=next_cursor)


@router.get("/{request_id}", summary="One forget request", responses=problem_responses(404))
def get_forget_request(
    request_id: schemas.PathId, state: State, principal: Submitter
) -> schemas.ForgetRequestOut:
    with state.transaction() as session:
        return presenters.forget_request(session, _visible(session, request_id, principal))


@router.get(
    "/{request_id}/events", summary="The request's lifecycle events", responses=problem_responses(404)
)
def get_forget_request_events(
    request_id: schemas.PathId, state: State, principal: Submitter
) -> list[schemas.EventOut]:
    with state.transaction() as session:
        row = _visible(session, request_id, principal)
        events_repo.chain_pending(session)  # the submission's events, if the sequencer has not yet
        events = events_repo.events_for_request(session, row.id)
        if row.status == "merged" and row.merged_into is not None and events:
            # what happened to the followed request since this one was merged into it
            events += events_repo.events_for_request(session, row.merged_into, after_id=events[-1].id)
        return [schemas.EventOut.from_row(e) for e in events]


@router.get(
    "/{request_id}/evidence",
    summary="The audit of the round that completed it",
    responses=problem_responses(404),
)
def get_forget_request_evidence(
    request_id: schemas.PathId, state: State, principal: Submitter
) -> list[schemas.EvidenceOut]:
    with state.transaction() as session:
        row = _visible(session, request_id, principal)
        source = row.merged_into if row.status == "merged" and row.merged_into is not None else row.id
        evidence = versions_repo.evidence_for_request(session, source)
        numbers = versions_repo.version_numbers(session, [e.version_id for e in evidence])
        # a merged request's evidence is that of the request it follows, under its own id
        return [
            schemas.EvidenceOut.from_row(
                e,
                version=numbers[e.version_id],
                request_id=row.id,
                payload={**e.payload, "request_id": row.id} if "request_id" in e.payload else e.payload,
            )
            for e in evidence
        ]
