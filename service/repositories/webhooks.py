"""Webhooks, their delivery outbox and the attempt log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db.models import ForgetRequest, Webhook, WebhookAttempt, WebhookDelivery


def create(
    session: Session, *, webhook_id: str, api_key_id: int, url: str, events: list[str], secret_ciphertext: str
) -> Webhook:
    row = Webhook(
        id=webhook_id, api_key_id=api_key_id, url=url, events=events, secret_ciphertext=secret_ciphertext
    )
    session.add(row)
    session.flush()
    return row


def count_for_key(session: Session, api_key_id: int) -> int:
    return session.scalar(select(func.count()).where(Webhook.api_key_id == api_key_id)) or 0


def list_webhooks(session: Session, *, api_key_id: int | None) -> list[Webhook]:
    """Webhooks of one key (None: all), oldest first."""
    stmt = select(Webhook).order_by(Webhook.created_at, Webhook.id)
    if api_key_id is not None:
        stmt = stmt.where(Webhook.api_key_id == api_key_id)
    return list(session.scalars(stmt))


def get(session: Session, webhook_id: str) -> Webhook | None:
    return session.get(Webhook, webhook_id)


def delete(session: Session, row: Webhook) -> None:
    """The webhook with its deliveries and their log (ON DELETE CASCADE)."""
    session.delete(row)
    session.flush()


def subscribed(session: Session, api_key_ids: Sequence[int], event: str) -> list[Webhook]:
    if not api_key_ids:
        return []
    rows = session.scalars(
        select(Webhook).where(Webhook.api_key_id.in_(set(api_key_ids))).order_by(Webhook.id)
    )
    return [row for row in rows if event in row.events]


def followers(session: Session, request_ids: Sequence[str]) -> list[ForgetRequest]:
    """``merged`` requests that follow any of ``request_ids`` (their submitters learn the result too)."""
    if not request_ids:
        return []
    return list(
        session.scalars(
            select(ForgetRequest).where(
                ForgetRequest.merged_into.in_(set(request_ids)), ForgetRequest.status == "merged"
            )
        )
    )


def requests_of_version(session: Session, version_id: int) -> list[ForgetRequest]:
    return list(
        session.scalars(
            select(ForgetRequest).where(ForgetRequest.version_id == version_id).order_by(ForgetRequest.seq)
        )
    )


def add_delivery(
    session: Session, *, delivery_id: str, webhook_id: str, event: str, payload: dict[str, Any], at: datetime
) -> WebhookDelivery:
    row = WebhookDelivery(
        id=delivery_id,
        webhook_id=webhook_id,
        event=event,
        payload=payload,
        status="pending",
        attempts=0,
        next_attempt_at=at,
        created_at=at,
    )
    session.add(row)
    return row


def deliveries(session: Session, webhook_id: str, *, limit: int) -> list[WebhookDelivery]:
    """Newest first."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(limit)
        )
    )


def get_delivery(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.get(WebhookDelivery, delivery_id)


def attempts_for(session: Session, delivery_ids: Sequence[str]) -> dict[str, list[WebhookAttempt]]:
    """``{delivery id: its attempts, oldest first}`` in one query."""
    found: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
    if delivery_ids:
        rows = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(set(delivery_ids)))
            .order_by(WebhookAttempt.id)
        )
        for row in rows:
            found[row.delivery_id].append(row)
    return found


def due(session: Session, *, now: datetime, limit: int) -> list[WebhookDelivery]:
    """Pending deliveries whose time has come, oldest due first."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit)
        )
    )


def claim(session: Session, row: WebhookDelivery, *, until: datetime) -> bool:
    """Push the delivery's due time to ``until`` unless another sender did first (compare and set
    on ``next_attempt_at``): the claimer sends it, and a sender that died leaves it due again."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == row.id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at == row.next_attempt_at,
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def add_attempt(
    session: Session,
    *,
    delivery_id: str,
    at: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
) -> None:
    session.add(
        WebhookAttempt(
            delivery_id=delivery_id, at=at, status_code=status_code, error=error, duration_ms=duration_ms
        )
    )
    session.flush()
