"""uvicorn's HTTP protocol, answering the 400s the server gives itself as problem+json.

A request the HTTP parser refuses (a ``Content-Length`` that is not a number, a malformed request
line or header) never reaches the application: uvicorn answers it with a ``text/plain`` 400. This
subclass of uvicorn's httptools protocol (what its ``auto`` choice runs; ``uvicorn[standard]``
installs httptools) sends the same 400 as an RFC 9457 problem. ``lethe serve`` runs uvicorn with it.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


def problem_body(detail: str) -> bytes:
    """The RFC 9457 body of a 400 the HTTP parser gives (no ``instance``: the request line may be
    what could not be parsed)."""
    problem = {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail}
    return json.dumps(problem).encode("ascii")


class ProblemHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = problem_body(msg)
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/problem+json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
