"""Wake-ups over a real Redis broker; a broker that is down never fails a request; the API runs no
sweeper (the workers' heartbeat is the only one)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service import cli, rounds
from service.api.app import create_app
from service.dispatch import QUEUE, TASK_PREPARE, TASK_WAKE, WAKE_MARKER, Dispatcher
from service.settings import Settings
from tests.service.conftest import Keys
from tests.service.helpers import client_body, task_body


@pytest.fixture
def broker(redis_server_url: str) -> Iterator[tuple[str, redis.Redis[bytes]]]:
    r = redis.Redis.from_url(redis_server_url)
    clean = [QUEUE, *(WAKE_MARKER.format(model=m) for m in ("digits", "fraud"))]
    r.delete(*clean)
    yield redis_server_url, r
    r.delete(*clean)
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
def test_post_wakes_the_model_and_registration_prepares_it(
    settings: Settings, keys: Keys, broker: tuple[str, redis.Redis[bytes]]
) -> None:
    url, r = broker
    live = settings.model_copy(update={"broker_url": url})
    with TestClient(create_app(live)) as client:
        assert client.get("/readyz").json()["broker"] == "ok"
        assert submit_c0(client, keys) == 201
        registered = client.post(
            "/v1/admin/models", json={"name": "fraud", "workload": "digits-clients"}, headers=keys.admin
        )
        assert registered.status_code == 201
    assert messages(r) == [(TASK_WAKE, ["digits"]), (TASK_PREPARE, ["fraud"])]


@pytest.mark.redis
@pytest.mark.usefixtures("ready_model")
def test_the_api_runs_no_sweeper(
    settings: Settings,
    keys: Keys,
    broker: tuple[str, redis.Redis[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 10 part 8, one sweeper: the app ``lethe serve`` runs (``create_app``) sweeps nothing;
    the workers' heartbeat is the only sweeper (failed before: the lifespan started a sweeper that
    looked for models to wake at once and sent this queued request's wake)."""
    url, r = broker
    with TestClient(create_app(settings)) as client:  # no broker: the request stays queued, unsent
        assert submit_c0(client, keys) == 201
    looked = threading.Event()
    models_to_wake = rounds.models_to_wake

    def spy(session: Session) -> list[str]:
        looked.set()
        return models_to_wake(session)

    monkeypatch.setattr(rounds, "models_to_wake", spy)
    live = settings.model_copy(update={"broker_url": url})
    with TestClient(create_app(live)) as client:
        assert client.get("/readyz").json()["broker"] == "ok"
        # the old sweeper's first sweep ran as the app started: 2 s is ample for it to show
        assert not looked.wait(2.0), "the API process looked for models to wake"
        running = client.portal.call(_task_names)  # type: ignore[union-attr]
    assert not [name for name in running if "sweep" in name], running
    assert messages(r) == []


async def _task_names() -> list[str]:
    return [task.get_name() for task in asyncio.all_tasks()]


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


def _post(client: TestClient, keys: Keys, body: dict[str, Any], key: str) -> float:
    """Seconds one submission took (it must be accepted)."""
    started = time.monotonic()
    response = client.post("/v1/forget-requests", json=body, headers={**keys.submit, "Idempotency-Key": key})
    assert response.status_code == 201, response.text
    return time.monotonic() - started


def _bodies() -> list[dict[str, Any]]:
    return [client_body(c) for c in ("c0", "c1", "c2")] + [
        task_body([f"s{i:05d}"], ["digit"]) for i in range(3)
    ]


@pytest.mark.usefixtures("ready_model")
def test_submissions_never_wait_on_a_hung_broker(settings: Settings, keys: Keys) -> None:
    """Issue 9 item 6 (failed on 5a93ed6: each POST waited up to the 2 s dispatch timeout while Redis
    was SIGSTOPped): a broker that accepts connections and never answers does not slow submissions."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # connections complete in the backlog; nothing ever answers
        port = hung.getsockname()[1]
        stalled = settings.model_copy(
            update={"broker_url": f"redis://127.0.0.1:{port}/0", "dispatch_timeout_seconds": 3.0}
        )
        with TestClient(create_app(stalled)) as client:
            took = [_post(client, keys, body, f"k{i}") for i, body in enumerate(_bodies())]
    assert max(took) < 1.5, took  # each waited >= 3 s on 5a93ed6


@pytest.mark.usefixtures("ready_model")
def test_a_down_broker_logs_one_line_per_outage(
    settings: Settings, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9 item 6 (failed on 5a93ed6: a ~107-line traceback per POST while Redis was down): one
    warning, without a traceback, for the whole outage."""
    down = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0", "dispatch_timeout_seconds": 0.5}
    )
    with caplog.at_level("DEBUG", logger="service.dispatch"), TestClient(create_app(down)) as client:
        for i, body in enumerate(_bodies()):
            _post(client, keys, body, f"k{i}")
        assert client.app.state.lethe.dispatcher.drain(10)  # type: ignore[attr-defined]
    warnings = [r for r in caplog.records if r.name == "service.dispatch" and r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None
    assert "broker unreachable" in warnings[0].getMessage()


@pytest.mark.redis
@pytest.mark.usefixtures("ready_model")
def test_at_most_one_outstanding_wake_per_model(
    settings: Settings, keys: Keys, broker: tuple[str, redis.Redis[bytes]]
) -> None:
    """Issue 9 item 7 (failed on 5a93ed6: every POST enqueued a wake, 13,324 after a load test):
    submissions while a wake is queued add none; once a worker started it (and deleted the marker,
    as ``worker.tasks.wake_started`` does) the next submission sends one."""
    url, r = broker
    live = settings.model_copy(update={"broker_url": url})
    bodies = _bodies()
    with TestClient(create_app(live)) as client:
        dispatcher = client.app.state.lethe.dispatcher  # type: ignore[attr-defined]
        for i, body in enumerate(bodies[:-1]):
            _post(client, keys, body, f"k{i}")
            assert dispatcher.drain(10)
        assert messages(r) == [(TASK_WAKE, ["digits"])]
        r.delete(WAKE_MARKER.format(model="digits"))  # a worker started the wake
        _post(client, keys, bodies[-1], "last")
        assert dispatcher.drain(10)
    assert messages(r) == [(TASK_WAKE, ["digits"])] * 2
