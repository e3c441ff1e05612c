"""Refuse oversized request bodies (413) before the application reads them."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response


class BodySizeLimit:
    """Pure ASGI middleware: checks ``Content-Length`` and counts streamed (chunked) bodies."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    status = 413 if length > self.max_bytes else 400
                    detail = (
                        f"the body is larger than {self.max_bytes} bytes"
                        if status == 413
                        else "invalid Content-Length"
                    )
                    await problem_response(status, detail=detail, instance=scope.get("path"))(
                        scope, receive, send
                    )
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)
