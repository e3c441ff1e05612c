"""Bearer API keys with scopes ``submit``, ``admin``, ``serve``; ``admin`` may do everything."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.state import AppState, State, get_state
from service.repositories import keys as keys_repo

SCOPE_DESCRIPTIONS = {
    "submit": "submit forget requests and read the caller's own requests",
    "serve": "download adapter versions and the base model",
    "admin": "everything: every request, the queue, workers, cancel / retry, the model registry",
}
bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="lethe_<random>",
    description="An API key (`lethe keys create --scope S`), sent as `Authorization: Bearer <key>`. "
    "Scopes, listed per operation under `security`: "
    + "; ".join(f"`{name}`: {meaning}" for name, meaning in SCOPE_DESCRIPTIONS.items())
    + ". Missing or unknown key: 401; a key without the scope: 403.",
)
#: The credentials dependency per scope (the scope shows in the OpenAPI ``security`` of operations).
_CREDENTIALS = {scope: Security(bearer, scopes=[scope]) for scope in SCOPE_DESCRIPTIONS}


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


def authenticate(
    request: Request, state: AppState, credentials: HTTPAuthorizationCredentials | None, scope: str
) -> Principal:
    """The caller's principal if its key is known and has ``scope`` (or ``admin``); else 401 / 403,
    or 429 while the caller's address sent too many unknown or revoked keys."""
    address = request.client.host if request.client is not None else "unknown"
    retry_after = state.auth_failures.retry_after(address)
    if retry_after is not None:
        raise HTTPException(
            429,
            f"too many unknown or revoked API keys from this address; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    if credentials is None or not credentials.credentials:
        raise _unauthorized("an API key is required (Authorization: Bearer <key>)")
    resolution = state.settings.key_last_used_resolution_seconds
    with state.reads() as session:  # one round trip: no transaction for a single look-up
        row = keys_repo.find_active(session, credentials.credentials)
        principal = None if row is None else Principal(row.id, row.prefix, frozenset(row.scopes))
        stale = keys_repo.needs_touch(row, resolution_seconds=resolution)
    if principal is not None and stale:  # at most once per resolution period and key
        with state.transaction() as session:
            keys_repo.touch(session, principal.key_id, resolution_seconds=resolution)
    if principal is None:
        state.auth_failures.record(address)
        raise _unauthorized("unknown or revoked API key")
    if scope not in principal.scopes and not principal.is_admin:
        raise HTTPException(403, f"this API key lacks the {scope!r} scope")
    return principal


#: The scope each dependency made by :func:`require` demands (see :func:`required_scope`).
_SCOPE_OF: dict[Callable[..., Principal], str] = {}


def require(scope: str) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and demands ``scope`` (or ``admin``)."""

    # A default, not an ``Annotated`` type: annotations are strings here and cannot see ``scope``.
    def dependency(
        request: Request, state: State, credentials: HTTPAuthorizationCredentials | None = _CREDENTIALS[scope]
    ) -> Principal:
        return authenticate(request, state, credentials, scope)

    _SCOPE_OF[dependency] = scope
    return dependency


#: Every authenticated operation may answer 429 (too many bad keys from the caller's address).
TOO_MANY_BAD_KEYS = {
    "description": "Too many unknown or revoked API keys from this client address; retry later",
    "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def required_scope(route: object) -> str | None:
    """The scope a route's :func:`require` dependency demands; ``None`` if it needs no key."""
    dependant: Dependant | None = getattr(route, "dependant", None)
    pending = [dependant] if dependant is not None else []
    while pending:
        current = pending.pop()
        if current.call in _SCOPE_OF:
            return _SCOPE_OF[current.call]
        pending.extend(current.dependencies)
    return None


async def authenticate_request(request: Request) -> None:
    """Authenticate ``request`` for the route it matched, outside FastAPI's dependency solving (for
    answers FastAPI gives before it runs the dependencies: a body that is not JSON). Raises 401 /
    403 as the route's own dependency would; does nothing for a route that needs no key."""
    scope = required_scope(request.scope.get("route"))
    if scope is None:
        return
    credentials = await bearer(request)
    await run_in_threadpool(authenticate, request, get_state(request), credentials, scope)


def document_scopes(schema: dict[str, Any]) -> dict[str, Any]:
    """Operations that need a scope accept an ``admin`` key too (as :func:`require` does), and may
    answer 429 after repeated bad keys."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            needed = [
                scope for req in operation.get("security", []) for scope in req.get(bearer.scheme_name, [])
            ]
            if needed and "admin" not in needed:
                operation["security"].append({bearer.scheme_name: ["admin"]})
            if needed:
                operation["responses"].setdefault("429", TOO_MANY_BAD_KEYS)
    return schema
