"""Wake-ups over a real Redis broker; a broker that is down never fails a request."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service import cli
from service.api.app import create_app
from service.dispatch import QUEUE, TASK_PREPARE, TASK_WAKE, Dispatcher
from service.settings import Settings
from service.sweeper import ResendThrottle, sweep_once
from tests.service.conftest import Keys
from tests.service.helpers import client_body


@pytest.fixture
def broker(redis_server_url: str) -> Iterator[tuple[str, redis.Redis[bytes]]]:
    r = redis.Redis.from_url(redis_server_url)
    r.delete(QUEUE)
    yield redis_server_url, r
    r.delete(QUEUE)
    r.close()


def messages(r: redis.Redis[bytes]) -> list[tuple[str, list[Any]]]:
    """(task name, args) of the messages waiting in the lethe-gpu queue, oldest first."""
    out = []
    for raw in reversed(r.lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], args))
    return out


def submit_c0(client: TestClient, keys: Keys) -> int:
    """Submit a forget request for client c0 of digits; its status code."""
    response = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "k"}
    )
    return response.status_code


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.redis
def test_dispatcher_sends_by_name_ids_only(broker: tuple[str, redis.Redis[bytes]]) -> None:
    url, r = broker
    dispatcher = Dispatcher(url)
    try:
        assert dispatcher.broker_state() == "ok"
        assert dispatcher.wake("digits")
        assert dispatcher.prepare("fraud")
    finally:
        dispatcher.close()
    assert messages(r) == [(TASK_WAKE, ["digits"]), (TASK_PREPARE, ["fraud"])]


def test_a_down_broker_is_logged_not_raised() -> None:
    dispatcher = Dispatcher(f"redis://127.0.0.1:{closed_port()}/0", timeout_seconds=1)
    started = time.monotonic()
    try:
        assert dispatcher.wake("digits") is False
        assert dispatcher.broker_state() == "unreachable"
    finally:
        dispatcher.close()
    assert time.monotonic() - started < 10
    assert Dispatcher(None).wake("digits") is False
    assert Dispatcher(None).broker_state() == "not configured"


@pytest.mark.usefixtures("ready_model")
def test_post_succeeds_when_the_broker_is_down(settings: Settings, keys: Keys) -> None:
    down = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0", "dispatch_timeout_seconds": 0.5}
    )
    with TestClient(create_app(down)) as client:
        assert submit_c0(client, keys) == 201


@pytest.mark.redis
@pytest.mark.usefixtures("ready_model")
def test_post_wakes_the_model_and_the_sweeper_resends(
    settings: Settings, keys: Keys, broker: tuple[str, redis.Redis[bytes]], sessions: sessionmaker[Session]
) -> None:
    url, r = broker
    live = settings.model_copy(update={"broker_url": url, "sweep_interval_seconds": 0})
    with TestClient(create_app(live)) as client:
        assert client.get("/readyz").json()["broker"] == "ok"
        assert submit_c0(client, keys) == 201
        registered = client.post(
            "/v1/admin/models", json={"name": "fraud", "workload": "digits-clients"}, headers=keys.admin
        )
        assert registered.status_code == 201
    assert messages(r) == [(TASK_WAKE, ["digits"]), (TASK_PREPARE, ["fraud"])]
    r.delete(QUEUE)
    # The message was lost: the sweeper finds the queued request and sends the wake-up again.
    dispatcher = Dispatcher(url)
    try:
        assert sweep_once(sessions, dispatcher) == ["digits"]
    finally:
        dispatcher.close()
    assert messages(r) == [(TASK_WAKE, ["digits"])]


@pytest.mark.redis
@pytest.mark.usefixtures("ready_model")
def test_lifespan_runs_the_sweeper(
    settings: Settings, keys: Keys, broker: tuple[str, redis.Redis[bytes]]
) -> None:
    url, r = broker
    with TestClient(create_app(settings)) as client:  # no broker: nothing is sent
        assert submit_c0(client, keys) == 201
    assert messages(r) == []
    live = settings.model_copy(update={"broker_url": url, "sweep_interval_seconds": 0.05})
    with TestClient(create_app(live)):
        deadline = time.monotonic() + 10
        while not messages(r) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (TASK_WAKE, ["digits"]) in messages(r)


def test_resend_throttle() -> None:
    now = [0.0]
    throttle = ResendThrottle(60, clock=lambda: now[0])
    assert throttle("a") is False
    assert throttle("a") is True
    assert throttle("b") is False
    now[0] = 61
    assert throttle("a") is False


@pytest.mark.redis
@pytest.mark.usefixtures("ready_model")
def test_lethe_sweep_one_shot(
    settings: Settings, keys: Keys, broker: tuple[str, redis.Redis[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, r = broker
    with TestClient(create_app(settings)) as client:
        assert submit_c0(client, keys) == 201
    monkeypatch.setenv("LETHE_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("LETHE_BROKER_URL", url)
    result = CliRunner().invoke(cli.main, ["sweep"])
    assert result.exit_code == 0, result.output
    assert "woke: digits" in result.output
    assert messages(r) == [(TASK_WAKE, ["digits"])]
