"""Bearer API keys with scopes ``submit``, ``admin``, ``serve``; ``admin`` may do everything."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.state import State
from service.repositories import keys as keys_repo

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer lethe_...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@dataclass(frozen=True)
class Principal:
    key_id: int
    prefix: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def actor(self) -> str:
        return f"key:{self.prefix}"


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def require(scope: str) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and demands ``scope`` (or ``admin``)."""

    def dependency(state: State, credentials: Credentials) -> Principal:
        if credentials is None or not credentials.credentials:
            raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
        with state.transaction() as session:
            row = keys_repo.find_active(session, credentials.credentials)
            principal = None if row is None else Principal(row.id, row.prefix, frozenset(row.scopes))
        if principal is None:
            raise _unauthorized("unknown or revoked API key")
        if scope not in principal.scopes and not principal.is_admin:
            raise HTTPException(403, f"this API key lacks the {scope!r} scope")
        return principal

    return dependency
