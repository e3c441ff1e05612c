"""Bind an id to each HTTP request's log lines and echo it in ``X-Request-ID``.

A caller's ``X-Request-ID`` is kept when it is short and plain (letters, digits, ``-_.:``), so a
proxy's id follows the request; otherwise a new one is made. Pure ASGI: no per-request task.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs

HEADER = b"x-request-id"
_PLAIN = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == HEADER), None)
        request_id = given.decode() if given is not None and _PLAIN.match(given) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        token = logs.bind(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.unbind(token)
