"""Small helpers shared by the API tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import uvicorn

from service.api.app import create_app
from service.settings import Settings


class ResponseLike(Protocol):
    """httpx's and the TestClient's (httpx2) responses alike."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def assert_is_problem(response: ResponseLike) -> dict[str, Any]:
    """The response is an RFC 9457 problem: its media type, and the members with their types."""
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert body["status"] == response.status_code, body
    for member in ("type", "title"):
        assert isinstance(body[member], str), body
        assert body[member], body
    assert isinstance(body.get("detail", ""), str), body
    assert isinstance(body.get("instance", ""), str), body
    return body


def assert_problem(response: ResponseLike, status: int, *, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and names ``field``)."""
    assert response.status_code == status, response.text
    body = assert_is_problem(response)
    if field is not None:
        assert body.get("field") == field, body
    return body


def client_body(client_id: str = "c0", model: str = "digits", **extra: Any) -> dict[str, Any]:
    return {"model": model, "kind": "client", "client_id": client_id, **extra}


def task_body(samples: list[str], tasks: list[str], model: str = "digits", **extra: Any) -> dict[str, Any]:
    return {"model": model, "kind": "task", "sample_ids": samples, "tasks": tasks, **extra}


@contextlib.contextmanager
def uvicorn_in_thread(settings: Settings, **config: Any) -> Iterator[int]:
    """The API on a real uvicorn server in a thread (``config``: more ``uvicorn.Config`` options);
    yields its port once the server has started, stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
