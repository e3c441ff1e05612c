"""Rows to response schemas (batched look-ups, no per-row queries in lists)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service.api import schemas
from service.db.models import ForgetRequest, Model, Round
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import rounds as rounds_repo
from service.repositories import versions as versions_repo


def forget_requests(session: Session, rows: Sequence[ForgetRequest]) -> list[schemas.ForgetRequestOut]:
    names = requests_repo.model_names(session, [r.model_id for r in rows])
    versions = versions_repo.version_numbers(
        session, [r.version_id for r in rows if r.version_id is not None]
    )
    return [
        schemas.ForgetRequestOut.from_row(
            r,
            model=names[r.model_id],
            version=versions.get(r.version_id) if r.version_id is not None else None,
        )
        for r in rows
    ]


def forget_request(session: Session, row: ForgetRequest) -> schemas.ForgetRequestOut:
    return forget_requests(session, [row])[0]


def model(session: Session, row: Model) -> schemas.ModelOut:
    latest = versions_repo.latest_active(session, row.id)
    return schemas.ModelOut.from_row(row, latest_version=latest.version if latest is not None else None)


def model_detail(session: Session, row: Model) -> schemas.ModelDetail:
    total, forgotten = models_repo.count_subjects(session, row.id)
    versions = [
        schemas.VersionSummary.from_row(v, parent=v.parent_version)
        for v in versions_repo.list_versions(session, row.id)
    ]
    return schemas.ModelDetail(
        **model(session, row).model_dump(), subjects=total, forgotten_subjects=forgotten, versions=versions
    )


def lease(session: Session, live: Round) -> schemas.LeaseOut:
    return schemas.LeaseOut.from_row(
        live,
        round_id=live.id,
        owner=live.lease_owner,
        expires_at=live.lease_expires_at,
        request_ids=[r.id for r in rounds_repo.covered_requests(session, live.id)],
    )
