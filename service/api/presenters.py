"""Rows to response schemas (batched look-ups, no per-row queries in lists)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service.api import schemas
from service.db.models import Certification, ForgetRequest, Model, Round
from service.repositories import certifications as certifications_repo
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import rounds as rounds_repo
from service.repositories import versions as versions_repo


def forget_requests(
    session: Session, rows: Sequence[ForgetRequest], *, model_names: dict[int, str] | None = None
) -> list[schemas.ForgetRequestOut]:
    """A ``merged`` request shows the progress of the request it follows (its status, times,
    attempts, error and version), with its own id, key, external id, receipt and deadline.
    ``model_names``: the names the caller knows already (by model id), not looked up again."""
    followed = requests_repo.get_requests(
        session, [r.merged_into for r in rows if r.status == "merged" and r.merged_into is not None]
    )
    shown = {r.id: followed.get(r.merged_into or "", r) if r.status == "merged" else r for r in rows}
    known = model_names or {}
    names = {
        **known,
        **requests_repo.model_names(session, [r.model_id for r in rows if r.model_id not in known]),
    }
    versions = versions_repo.version_numbers(
        session, [s.version_id for s in shown.values() if s.version_id is not None]
    )
    rounds = rounds_repo.rounds_by_id(
        session, [s.round_id for s in shown.values() if s.round_id is not None and s.status in PROGRESS_SHOWN]
    )
    out = []
    for r in rows:
        s = shown[r.id]
        out.append(
            schemas.ForgetRequestOut.from_row(
                r,
                model=names[r.model_id],
                version=versions.get(s.version_id) if s.version_id is not None else None,
                status=s.status,
                updated_at=max(r.updated_at, s.updated_at),
                completed_at=s.completed_at,
                attempts=s.attempts,
                error=s.error,
                progress=_progress(
                    rounds.get(s.round_id) if s.status in PROGRESS_SHOWN and s.round_id else None
                ),
            )
        )
    return out


#: Statuses whose round progress is shown: running rounds, and where a failed request's round stopped.
PROGRESS_SHOWN = ("running", "verifying", "failed")


def _progress(round_: Round | None) -> schemas.RoundProgressOut | None:
    if round_ is None or round_.progress_stage is None or round_.progress_at is None:
        return None
    return schemas.RoundProgressOut(
        round_id=round_.id,
        stage=round_.progress_stage,  # the worker writes ROUND_STAGES only
        step=round_.progress_step or 0,
        of=round_.progress_of or 0,
        updated_at=round_.progress_at,
    )


def forget_request(
    session: Session, row: ForgetRequest, *, model_name: str | None = None
) -> schemas.ForgetRequestOut:
    names = {row.model_id: model_name} if model_name is not None else None
    return forget_requests(session, [row], model_names=names)[0]


def model(session: Session, row: Model) -> schemas.ModelOut:
    latest = versions_repo.latest_active(session, row.id)
    return schemas.ModelOut.from_row(row, latest_version=latest.version if latest is not None else None)


def model_detail(session: Session, row: Model) -> schemas.ModelDetail:
    total, forgotten = models_repo.count_subjects(session, row.id)
    rows = versions_repo.list_versions(session, row.id)
    certified = certifications_repo.latest_by_version(session, [v.id for v in rows])
    versions = []
    for v in rows:
        cert = certified.get(v.id)
        out = certification(cert, model=row.name, version=v.version) if cert is not None else None
        versions.append(
            schemas.VersionSummary.from_row(
                v,
                parent=v.parent_version,
                certification=out,
                flagged=out is not None and out.status == "flagged",
            )
        )
    return schemas.ModelDetail(
        **model(session, row).model_dump(), subjects=total, forgotten_subjects=forgotten, versions=versions
    )


def certification(row: Certification, *, model: str, version: int) -> schemas.CertificationOut:
    result = row.result or {}
    return schemas.CertificationOut.from_row(
        row,
        model=model,
        version=version,
        verdict=result.get("verdict"),
        within_bounds=result.get("within_bounds"),
    )


def lease(session: Session, live: Round) -> schemas.LeaseOut:
    return schemas.LeaseOut.from_row(
        live,
        round_id=live.id,
        owner=live.lease_owner,
        expires_at=live.lease_expires_at,
        request_ids=[r.id for r in rounds_repo.covered_requests(session, live.id)],
    )
