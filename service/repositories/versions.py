"""Adapter versions of a model and the evidence rows attached to requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db.models import AdapterVersion, ApiKey, Evidence, Model


def latest_active(session: Session, model_id: int) -> AdapterVersion | None:
    stmt = (
        select(AdapterVersion)
        .where(AdapterVersion.model_id == model_id, AdapterVersion.status == "active")
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def latest_active_id(session: Session, model_name: str) -> tuple[int, int | None] | None:
    """``(model id, id of its latest active version or None)`` in one indexed query; None when the
    model is not registered. Conditional GETs check their cached ETag against this."""
    latest = (
        select(AdapterVersion.id)
        .where(AdapterVersion.model_id == Model.id, AdapterVersion.status == "active")
        .order_by(AdapterVersion.version.desc())
        .limit(1)
        .scalar_subquery()
    )
    row = session.execute(select(Model.id, latest).where(Model.name == model_name)).one_or_none()
    return None if row is None else (row[0], row[1])


@dataclass(frozen=True)
class KeyAndLatest:
    """An API key's row fields and a model's latest active version id, read together."""

    key_id: int
    scopes: list[str]
    revoked: bool
    last_used_at: datetime | None
    latest_version_id: int | None


def key_and_latest(session: Session, key_hash: str, model_name: str) -> KeyAndLatest | None:
    """The key with ``key_hash`` and the id of ``model_name``'s latest active version, in one round
    trip (a conditional GET's whole check); None when no key has that hash."""
    latest = (
        select(AdapterVersion.id)
        .join(Model, AdapterVersion.model_id == Model.id)
        .where(Model.name == model_name, AdapterVersion.status == "active")
        .order_by(AdapterVersion.version.desc())
        .limit(1)
        .scalar_subquery()
    )
    stmt = select(ApiKey.id, ApiKey.scopes, ApiKey.revoked_at, ApiKey.last_used_at, latest).where(
        ApiKey.key_hash == key_hash
    )
    row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    return KeyAndLatest(row[0], list(row[1]), row[2] is not None, row[3], row[4])


def get_version(session: Session, model_id: int, version: int) -> AdapterVersion | None:
    return session.scalar(
        select(AdapterVersion).where(AdapterVersion.model_id == model_id, AdapterVersion.version == version)
    )


def list_versions(session: Session, model_id: int) -> list[AdapterVersion]:
    stmt = select(AdapterVersion).where(AdapterVersion.model_id == model_id).order_by(AdapterVersion.version)
    return list(session.scalars(stmt))


def next_version_number(session: Session, model_id: int) -> int:
    current = session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.model_id == model_id)
    )
    return int(current or 0) + 1


def add_version(
    session: Session,
    *,
    model_id: int,
    version: int,
    parent_version: int | None,
    location: str,
    files: dict[str, Any],
    round_id: int | None,
    evidence: dict[str, Any] | None = None,
) -> AdapterVersion:
    row = AdapterVersion(
        model_id=model_id,
        version=version,
        parent_version=parent_version,
        location=location,
        files=files,
        round_id=round_id,
        status="active",
        evidence=evidence,
    )
    session.add(row)
    session.flush()
    return row


def withdraw(session: Session, model_id: int, versions: Sequence[int], *, at: datetime) -> None:
    if not versions:
        return
    session.execute(
        update(AdapterVersion)
        .where(
            AdapterVersion.model_id == model_id,
            AdapterVersion.version.in_(versions),
            AdapterVersion.status == "active",
        )
        .values(status="withdrawn", withdrawn_at=at)
    )


def add_evidence(
    session: Session, *, request_id: str, round_id: int, version_id: int, payload: dict[str, Any]
) -> Evidence:
    row = Evidence(request_id=request_id, round_id=round_id, version_id=version_id, payload=payload)
    session.add(row)
    return row


def evidence_for_request(session: Session, request_id: str) -> list[Evidence]:
    stmt = select(Evidence).where(Evidence.request_id == request_id).order_by(Evidence.id)
    return list(session.scalars(stmt))


def evidence_of_version(session: Session, version_id: int) -> list[Evidence]:
    stmt = select(Evidence).where(Evidence.version_id == version_id).order_by(Evidence.id)
    return list(session.scalars(stmt))


def version_numbers(session: Session, version_ids: Sequence[int]) -> dict[int, int]:
    """``{adapter_versions.id: version number}``."""
    if not version_ids:
        return {}
    rows = session.execute(
        select(AdapterVersion.id, AdapterVersion.version).where(AdapterVersion.id.in_(set(version_ids)))
    )
    return {row.id: row.version for row in rows}
