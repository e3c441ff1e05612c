"""Answer a matching conditional GET of a model's latest adapter before routing (issue 10 part 5).

``GET /v1/models/{model}/adapters/latest`` with ``If-None-Match`` is what every serving host polls.
Through FastAPI it costs the routing, the dependency solving (the key look-up) and a second query
for the latest version. This pure-ASGI middleware answers the common case, a ``serve`` (or
``admin``) key whose ``If-None-Match`` names the cached ETag of the version that is still the
latest, with one read (:func:`~service.repositories.versions.key_and_latest`: the key and the
latest version id together) and a 304. It decides nothing else: in every other case (no cached
ETag, no match, unknown / revoked key, missing scope, a throttled address, a key whose last use is
due to be written, a database error) it passes the request to the route unchanged, which answers
as it always did. Revocation stays immediate: the key is read on every request, never cached.
"""

from __future__ import annotations

import re

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.state import AppState
from service.artifacts import etag_matches
from service.repositories import keys as keys_repo
from service.repositories import versions as versions_repo

_LATEST = re.compile(r"/v1/models/([^/]+)/adapters/latest")
_SCOPES = frozenset({"serve", "admin"})


def not_modified(etag: str) -> Response:
    """The 304 of the latest adapter (the route answers the same)."""
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})


class NotModifiedShortcut:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        etag = (
            await self._current_etag(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        )
        if etag is None:
            await self.app(scope, receive, send)
            return
        await not_modified(etag)(scope, receive, send)

    async def _current_etag(self, scope: Scope) -> str | None:
        """The ETag to answer 304 with, or None: let the route answer."""
        match = _LATEST.fullmatch(scope["path"])
        if match is None:
            return None
        if_none_match = authorization = None
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                if_none_match = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        if not if_none_match or not authorization:
            return None
        state = getattr(scope["app"].state, "lethe", None)
        if not isinstance(state, AppState):
            return None
        model = match.group(1)  # ASGI paths are percent-decoded already
        cached = state.latest_etags.entry(model)
        if cached is None or not etag_matches(if_none_match, cached[1]):
            return None
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return None
        client = scope.get("client")
        if state.auth_failures.retry_after(client[0] if client else "unknown") is not None:
            return None
        try:
            found = await run_in_threadpool(_check, state, keys_repo.hash_key(secret), model)
        except Exception:  # the route meets the same error and answers it (503)
            return None
        resolution = state.settings.key_last_used_resolution_seconds
        if (
            found is None
            or found.revoked
            or not _SCOPES & set(found.scopes)
            or found.latest_version_id != cached[0]
            or keys_repo.last_use_due(found.last_used_at, resolution_seconds=resolution)
        ):
            return None
        return cached[1]


def _check(state: AppState, key_hash: str, model: str) -> versions_repo.KeyAndLatest | None:
    with state.reads() as session:
        return versions_repo.key_and_latest(session, key_hash, model)
