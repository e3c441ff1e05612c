"""The load generator (``service.loadtest``): several client processes, results merged."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Header

from service.loadtest import Call, _free_port, measure


@pytest.fixture
def echo_server() -> Iterator[tuple[str, list[str]]]:
    """A tiny HTTP server in a thread that records each call's Idempotency-Key."""
    seen: list[str] = []
    app = FastAPI()

    @app.post("/v1/forget-requests", status_code=201)
    def create(idempotency_key: str = Header(alias="Idempotency-Key")) -> dict[str, str]:
        seen.append(idempotency_key)
        return {"key": idempotency_key}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    ready = threading.Event()
    for _ in range(200):
        if server.started:
            ready.set()
            break
        ready.wait(0.05)
    assert ready.is_set(), "the echo server did not start"
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_client_processes_merge_results_and_never_share_a_number(echo_server: tuple[str, list[str]]) -> None:
    """Issue 10 part 5: the one-process generator capped the bare endpoint; ``measure`` now splits the
    clients over processes. Every call is counted once in the merged result, and the calls' numbers
    (idempotency keys, client ids) are unique across the processes."""
    base, seen = echo_server
    call = Call("POST", "/v1/forget-requests", {}, body={"model": "m"}, idempotency="k-{n}")
    measured = measure(base, call, concurrency=5, duration=0.5, processes=2)
    assert measured.statuses == {"201": len(measured.latencies)}
    assert len(measured.latencies) == len(seen) > 0
    assert len(set(seen)) == len(seen)
    assert 0.5 <= measured.seconds < 10
