"""Outbox rows for webhook events, written in the transaction of the state change they report.

Each delivery reports one request to the webhooks of the key that submitted it (and of the keys
whose ``merged`` requests follow it, under their own request ids). Payloads carry request ids,
statuses, the model, versions and verdicts: never subject ids, sample ids or error texts (which may
quote them).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.db.models import Certification, ForgetRequest
from service.db.types import utcnow
from service.repositories import requests as requests_repo
from service.repositories import webhooks as webhooks_repo

REQUEST_COMPLETED = "forget_request.completed"
REQUEST_FAILED = "forget_request.failed"
CERTIFICATION_FINISHED = "certification.finished"


def new_delivery_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def request_results(
    session: Session,
    requests: Sequence[ForgetRequest],
    event: str,
    *,
    status: str,
    data: dict[str, Any] | None = None,
    per_request: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Queue ``event`` for every webhook subscribed to it by the submitters of ``requests`` (and of
    the requests merged into them). Returns the number of deliveries queued; only flushes."""
    if not requests:
        return 0
    followers = webhooks_repo.followers(session, [r.id for r in requests])
    reported = [(r, None) for r in requests] + [(f, f.merged_into) for f in followers]
    key_ids = {r.api_key_id for r, _ in reported if r.api_key_id is not None}
    hooks = webhooks_repo.subscribed(session, sorted(key_ids), event)
    if not hooks:
        return 0
    names = requests_repo.model_names(session, [r.model_id for r, _ in reported])
    now = utcnow()
    queued = 0
    for hook in hooks:
        for request, follows in reported:
            if request.api_key_id != hook.api_key_id:
                continue
            source = follows or request.id
            body: dict[str, Any] = {
                "request_id": request.id,
                "status": status,
                "model": names.get(request.model_id),
                **(data or {}),
                **(per_request or {}).get(source, {}),
            }
            if follows is not None:
                body["merged_into"] = follows
            payload = {"type": event, "timestamp": now.isoformat(), "data": body}
            webhooks_repo.add_delivery(
                session,
                delivery_id=new_delivery_id(),
                webhook_id=hook.id,
                event=event,
                payload=payload,
                at=now,
            )
            queued += 1
    session.flush()
    return queued


def certification_finished(
    session: Session, row: Certification, *, version: int, verdicts: dict[str, str] | None = None
) -> int:
    """Queue ``certification.finished`` for the requests the certified version completed."""
    requests = webhooks_repo.requests_of_version(session, row.version_id)
    return request_results(
        session,
        requests,
        CERTIFICATION_FINISHED,
        status="completed",
        data={"certification_id": row.id, "certification_status": row.status, "version": version},
        per_request={rid: {"verdict": verdict} for rid, verdict in (verdicts or {}).items()},
    )
