"""API keys: only the SHA-256 of a key is stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey

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
