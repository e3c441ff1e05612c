"""API-side use case of certification: request a retrain-based check of a published version.

Only flushes; the caller commits and then sends ``lethe.certify_version`` (ids only) through
:class:`service.dispatch.Dispatcher`. The worker runs it on its own queue (``worker/certification.py``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Certification
from service.errors import ConflictError, NotFoundError
from service.repositories import certifications as certifications_repo
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.webhooks import events as webhook_events


def request_certification(
    session: Session, model_name: str, version: int, *, actor: str, trigger: str = "on_demand"
) -> tuple[Certification, bool]:
    """The version's live certification, or a new one (``requested``). Returns it and whether it
    was created. 404: unknown model or version; 409: v1 (it served no request) or a withdrawn
    version (its files are deleted)."""
    model = models_repo.get_model(session, model_name)
    if model is None:
        raise NotFoundError(f"model {model_name!r} is not registered")
    row = versions_repo.get_version(session, model.id, version)
    if row is None:
        raise NotFoundError(f"model {model_name!r} has no version {version}")
    if row.round_id is None:
        raise ConflictError(
            f"version {version} of {model_name!r} served no forget request: nothing to certify"
        )
    if row.status != "active":
        raise ConflictError(f"version {version} of {model_name!r} is {row.status}: its files are deleted")
    live = certifications_repo.live_for_version(session, row.id)
    if live is not None:
        return live, False
    try:
        with session.begin_nested():  # a concurrent request may create it first (unique index)
            created = certifications_repo.create(
                session, model_id=model.id, version_id=row.id, trigger=trigger, requested_by=actor
            )
    except IntegrityError:
        live = certifications_repo.live_for_version(session, row.id)
        if live is None:
            raise
        return live, False
    return created, True


def finish(
    session: Session,
    row: Certification,
    *,
    status: str,
    version: int,
    at: datetime,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    verdicts: dict[str, str] | None = None,
) -> None:
    """Record the certification's end and queue the submitters' ``certification.finished`` webhook
    deliveries in the same transaction (``verdicts``: each request's own verdict)."""
    certifications_repo.finish(session, row, status=status, at=at, result=result, error=error)
    webhook_events.certification_finished(session, row, version=version, verdicts=verdicts)
