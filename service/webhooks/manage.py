"""Use cases behind ``/v1/webhooks``: register (the secret shown once), replay a delivery.

Only flushes; the request boundary commits.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from service.db.models import Webhook, WebhookDelivery
from service.db.types import utcnow
from service.errors import ConflictError
from service.repositories import webhooks as webhooks_repo
from service.webhooks.addresses import check_url
from service.webhooks.signing import SecretBox, new_secret


def register(
    session: Session,
    box: SecretBox,
    *,
    api_key_id: int,
    url: str,
    events: list[str],
    allow_private: bool,
    max_per_key: int,
) -> tuple[Webhook, str]:
    """A new webhook of the key and its secret (returned once, stored encrypted). 422: the URL is
    refused; 409: the key has ``max_per_key`` webhooks already."""
    check_url(url, allow_private=allow_private)
    if webhooks_repo.count_for_key(session, api_key_id) >= max_per_key:
        raise ConflictError(f"this API key has {max_per_key} webhooks already; delete one first")
    webhook_id = str(uuid.uuid4())
    secret = new_secret()
    row = webhooks_repo.create(
        session,
        webhook_id=webhook_id,
        api_key_id=api_key_id,
        url=url,
        events=sorted(set(events)),
        secret_ciphertext=box.seal(secret, webhook_id=webhook_id),
    )
    return row, secret


def replay(session: Session, delivery: WebhookDelivery) -> WebhookDelivery:
    """Queue the delivery again, due now, with a fresh retry budget (same ``webhook-id`` and body);
    a worker sends it."""
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.delivered_at = None
    session.flush()
    return delivery
