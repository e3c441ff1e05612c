"""Rows to response schemas (batched look-ups, no per-row queries in lists)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service.api import schemas
from service.db.models import ForgetRequest
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo


def forget_requests(session: Session, rows: Sequence[ForgetRequest]) -> list[schemas.ForgetRequestOut]:
    names = requests_repo.model_names(session, [r.model_id for r in rows])
    versions = versions_repo.version_numbers(
        session, [r.version_id for r in rows if r.version_id is not None]
    )
    return [
        schemas.ForgetRequestOut(
            id=r.id,
            model=names[r.model_id],
            kind="client" if r.kind == "client" else "task",
            client_id=r.client_id,
            sample_ids=r.sample_ids,
            tasks=list(r.tasks),
            status=r.status,
            external_id=r.external_id,
            received_at=r.received_at,
            due_at=r.due_at,
            updated_at=r.updated_at,
            completed_at=r.completed_at,
            attempts=r.attempts,
            error=r.error,
            version=versions.get(r.version_id) if r.version_id is not None else None,
        )
        for r in rows
    ]


def forget_request(session: Session, row: ForgetRequest) -> schemas.ForgetRequestOut:
    return forget_requests(session, [row])[0]
