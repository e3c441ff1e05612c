"""API keys: only the SHA-256 of a key is stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.db.models import ApiKey
from service.db.types import as_utc, utcnow

KEY_PREFIX = "lethe_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(session: Session, scopes: Sequence[str], *, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key: the row and the secret (shown once, never stored)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(key_hash=hash_key(secret), prefix=secret[:12], name=name, scopes=sorted(set(scopes)))
    session.add(row)
    session.flush()
    return row, secret


def find_active(session: Session, key: str) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def get_key(session: Session, key_id: int, *, lock: bool = False) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.id == key_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    return session.scalar(stmt)


def revoke_key(session: Session, row: ApiKey) -> ApiKey:
    """Revoke ``row`` (idempotent: a revoked key keeps its first revocation time)."""
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def rotate_key(session: Session, row: ApiKey) -> tuple[ApiKey, str]:
    """A new secret for ``row``; the old one stops working at once. The key keeps its id, scopes,
    requests and idempotency keys (a ``submit`` key still sees what it submitted)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row.key_hash = hash_key(secret)
    row.prefix = secret[:12]
    row.rotated_at = utcnow()
    session.flush()
    return row, secret


def needs_touch(row: ApiKey | None, *, resolution_seconds: float) -> bool:
    """Whether :func:`touch` may write: saves its UPDATE round trip on most authenticated calls."""
    return row is not None and last_use_due(row.last_used_at, resolution_seconds=resolution_seconds)


def last_use_due(last_used_at: datetime | None, *, resolution_seconds: float) -> bool:
    """Whether a key last used at ``last_used_at`` is due for its next ``last_used_at`` write."""
    return last_used_at is None or as_utc(last_used_at) <= utcnow() - timedelta(seconds=resolution_seconds)


def touch(session: Session, key_id: int, *, resolution_seconds: float) -> None:
    """Record a use of the key, writing at most once per ``resolution_seconds`` (not a write per call)."""
    now = utcnow()
    stale = now - timedelta(seconds=resolution_seconds)
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= stale))
        .values(last_used_at=now)
    )
