"""``/v1/webhooks``: a submitter's endpoints for signed result notifications, their delivery log
and replay. A key sees its own webhooks (an admin sees all)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy.orm import Session

from service.api import webhook_schemas as schemas
from service.api.auth import Principal, require
from service.api.problems import problem_responses
from service.api.schemas import PathId
from service.api.state import State
from service.db.models import Webhook, WebhookDelivery
from service.errors import NotFoundError
from service.repositories import webhooks as webhooks_repo
from service.webhooks import manage
from service.webhooks.signing import SecretBox

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=problem_responses(401, 403, 503))
Submitter = Annotated[Principal, Depends(require("submit"))]


def _visible(session: Session, webhook_id: str, principal: Principal) -> Webhook:
    row = webhooks_repo.get(session, webhook_id)
    if row is None or not (principal.is_admin or row.api_key_id == principal.key_id):
        raise NotFoundError(f"webhook {webhook_id!r} does not exist")
    return row


def _delivery(session: Session, hook: Webhook, delivery_id: str) -> WebhookDelivery:
    row = webhooks_repo.get_delivery(session, delivery_id)
    if row is None or row.webhook_id != hook.id:
        raise NotFoundError(f"delivery {delivery_id!r} of webhook {hook.id!r} does not exist")
    return row


def _deliveries_out(session: Session, rows: list[WebhookDelivery]) -> list[schemas.DeliveryOut]:
    log = webhooks_repo.attempts_for(session, [r.id for r in rows])
    return [
        schemas.DeliveryOut.from_row(r, log=[schemas.AttemptOut.from_row(a) for a in log[r.id]]) for r in rows
    ]


@router.post(
    "",
    status_code=201,
    summary="Register a webhook; its signing secret is in this answer only",
    responses=problem_responses(409, 413),
)
def create_webhook(body: schemas.WebhookIn, state: State, principal: Submitter) -> schemas.WebhookWithSecret:
    with state.transaction() as session:
        row, secret = manage.register(
            session,
            SecretBox.from_settings(state.settings),
            api_key_id=principal.key_id,
            url=body.url,
            events=list(body.events),
            allow_private=state.settings.webhook_allow_private_addresses,
            max_per_key=state.settings.webhook_max_per_key,
        )
        return schemas.WebhookWithSecret.from_row(row, secret=secret)


@router.get("", summary="The caller's webhooks (never their secrets)")
def list_webhooks(state: State, principal: Submitter) -> list[schemas.WebhookOut]:
    with state.transaction() as session:
        rows = webhooks_repo.list_webhooks(
            session, api_key_id=None if principal.is_admin else principal.key_id
        )
        return [schemas.WebhookOut.from_row(r) for r in rows]


@router.get("/{webhook_id}", summary="One webhook", responses=problem_responses(404))
def get_webhook(webhook_id: PathId, state: State, principal: Submitter) -> schemas.WebhookOut:
    with state.transaction() as session:
        return schemas.WebhookOut.from_row(_visible(session, webhook_id, principal))


@router.delete(
    "/{webhook_id}",
    status_code=204,
    summary="Delete a webhook with its pending deliveries and log",
    responses=problem_responses(404),
)
def delete_webhook(webhook_id: PathId, state: State, principal: Submitter) -> Response:
    with state.transaction() as session:
        webhooks_repo.delete(session, _visible(session, webhook_id, principal))
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries",
    summary="The delivery log, newest first: each delivery with every attempt",
    responses=problem_responses(404),
)
def list_deliveries(
    webhook_id: PathId,
    state: State,
    principal: Submitter,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.DeliveryPage:
    with state.transaction() as session:
        hook = _visible(session, webhook_id, principal)
        return schemas.DeliveryPage(
            items=_deliveries_out(session, webhooks_repo.deliveries(session, hook.id, limit=limit))
        )


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/replay",
    status_code=202,
    summary="Send a delivery again (same webhook-id and body; a worker sends it)",
    responses=problem_responses(404),
)
def replay_delivery(
    webhook_id: PathId, delivery_id: PathId, state: State, principal: Submitter
) -> schemas.DeliveryOut:
    with state.transaction() as session:
        hook = _visible(session, webhook_id, principal)
        row = manage.replay(session, _delivery(session, hook, delivery_id))
        return _deliveries_out(session, [row])[0]
