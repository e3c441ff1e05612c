"""Health, routing errors as problem+json, and the OpenAPI document."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from service import lifecycle
from service.api.app import create_app
from service.api.schemas import IDEMPOTENCY_KEY_PATTERN
from service.settings import Settings
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "database": "ok", "broker": "not configured"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_readyz_reports_an_unreachable_broker(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0"})
    with TestClient(create_app(down)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["broker"] == "unreachable"


def test_readyz_without_database_is_503(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://lethe@127.0.0.1:{_closed_port()}/lethe?connect_timeout=2"
    with TestClient(create_app(Settings(home=tmp_path, database_url=url))) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
        unavailable = client.get("/v1/admin/queue", headers={"Authorization": "Bearer lethe_x"})
    assert_problem(unavailable, 503)
    body = assert_problem(response, 503)
    assert body["database"] == "unreachable"


def test_routing_errors_are_problems(client: TestClient, keys: Keys) -> None:
    assert_problem(client.get("/nope"), 404)
    assert_problem(client.get("/v1/forget-requests/a/b/c", headers=keys.admin), 404)
    assert_problem(client.delete("/v1/forget-requests", headers=keys.admin), 405)
    assert_problem(client.put("/healthz"), 405)


STATUSES = {
    ("post", "/v1/forget-requests"): "200 201 400 401 403 404 409 413 415 422 429 503",
    ("get", "/v1/forget-requests"): "200 400 401 403 404 422 429 503",
    ("post", "/v1/forget-requests/bulk"): "200 400 401 403 413 415 422 429 503",
    ("get", "/v1/forget-requests/{request_id}"): "200 401 403 404 429 503",
    ("get", "/v1/forget-requests/{request_id}/events"): "200 401 403 404 429 503",
    ("get", "/v1/forget-requests/{request_id}/evidence"): "200 401 403 404 429 503",
    ("post", "/v1/webhooks"): "201 400 401 403 409 413 415 422 429 503",
    ("get", "/v1/webhooks"): "200 401 403 429 503",
    ("get", "/v1/webhooks/{webhook_id}"): "200 401 403 404 429 503",
    ("delete", "/v1/webhooks/{webhook_id}"): "204 401 403 404 429 503",
    ("get", "/v1/webhooks/{webhook_id}/deliveries"): "200 401 403 404 422 429 503",
    ("post", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/replay"): "202 401 403 404 429 503",
    ("get", "/v1/admin/queue"): "200 401 403 429 503",
    ("get", "/v1/admin/workers"): "200 401 403 429 503",
    ("post", "/v1/admin/forget-requests/{request_id}/cancel"): "200 401 403 404 409 429 503",
    ("post", "/v1/admin/forget-requests/{request_id}/retry"): "200 401 403 404 409 429 503",
    ("get", "/v1/admin/models"): "200 401 403 429 503",
    ("post", "/v1/admin/models"): "201 400 401 403 409 413 415 422 429 503",
    ("get", "/v1/admin/models/{name}"): "200 401 403 404 429 503",
    ("patch", "/v1/admin/models/{name}"): "200 400 401 403 404 409 413 415 422 429 503",
    ("get", "/v1/admin/models/{name}/events"): "200 401 403 404 429 503",
    ("get", "/v1/admin/models/{name}/clients"): "200 400 401 403 404 422 429 503",
    ("get", "/v1/admin/models/{name}/clients/{client_id}/samples"): "200 400 401 403 404 422 429 503",
    ("post", "/v1/admin/models/{name}/versions/{version}/certify"): "202 401 403 404 409 429 503",
    ("get", "/v1/admin/methods"): "200 401 403 429 503",
    ("get", "/v1/admin/audit/verify"): "200 401 403 429 503",
    ("get", "/v1/admin/queue/requests"): "200 400 401 403 404 422 429 503",
    ("post", "/v1/admin/forget-requests/{request_id}/extend"): "200 400 401 403 404 409 413 415 422 429 503",
    ("get", "/v1/admin/keys"): "200 401 403 429 503",
    ("post", "/v1/admin/keys"): "201 400 401 403 413 415 422 429 503",
    ("post", "/v1/admin/keys/{key_id}/revoke"): "200 401 403 404 429 503",
    ("post", "/v1/admin/keys/{key_id}/rotate"): "200 401 403 404 409 429 503",
    ("get", "/v1/models/{model}/adapters/latest"): "200 304 401 403 404 429 503",
    ("get", "/v1/models/{model}/adapters/{version}"): "200 304 401 403 404 410 429 503",
    ("get", "/v1/models/{model}/adapters/{version}/files/{name}"): "200 304 401 403 404 410 429 503",
    ("head", "/v1/models/{model}/adapters/{version}/files/{name}"): "200 304 401 403 404 410 429 503",
    ("get", "/v1/models/{model}/base"): "200 304 401 403 404 429 503",
    ("get", "/v1/models/{model}/base/files/{name}"): "200 304 401 403 404 429 503",
    ("head", "/v1/models/{model}/base/files/{name}"): "200 304 401 403 404 429 503",
    ("get", "/healthz"): "200",
    ("get", "/readyz"): "200 503",
}
SCOPE_BY_PREFIX = {
    "/v1/forget-requests": "submit",
    "/v1/webhooks": "submit",
    "/v1/admin/": "admin",
    "/v1/models/": "serve",
}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = create_app(Settings(database_url="sqlite://")).openapi()
    return document


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, item in doc["paths"].items() for method, op in item.items()}


def test_openapi_is_served_and_every_reference_resolves(client: TestClient, openapi: dict[str, Any]) -> None:
    """Structural checks (openapi-spec-validator is not a dependency)."""
    assert client.get("/openapi.json").json() == openapi
    assert openapi["openapi"].startswith("3.1.")
    assert openapi["info"]["title"] == "Lethe"
    schemas = openapi["components"]["schemas"]
    for ref in _refs(openapi):
        where, name = ref.rsplit("/", 1)
        assert where == "#/components/schemas", ref
        assert name in schemas, ref
    operations = _operations(openapi)
    assert len({op["operationId"] for op in operations.values()}) == len(operations)
    for key, operation in operations.items():
        assert operation["summary"], key
        assert operation["tags"], key


def test_openapi_lists_every_status_each_operation_answers(openapi: dict[str, Any]) -> None:
    listed = {key: " ".join(sorted(op["responses"])) for key, op in _operations(openapi).items()}
    assert listed == STATUSES


def test_openapi_errors_are_problems_and_successes_have_schemas(openapi: dict[str, Any]) -> None:
    problem_body = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for key, operation in _operations(openapi).items():
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == problem_body, (key, status)
            elif status not in ("204", "304"):  # no body
                assert set(response["content"]) <= {"application/json", "application/octet-stream"}, key
                json_body = response["content"].get("application/json", {"schema": {}})
                assert "schema" in json_body, key
    problem = openapi["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "instance", "field", "errors"} <= set(problem["properties"])
    assert {"type", "title", "status"} <= set(problem["required"])
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    operations = _operations(openapi)
    latest = operations[("get", "/v1/models/{model}/adapters/latest")]["responses"]
    assert latest["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AdapterOut")
    download = operations[("get", "/v1/models/{model}/adapters/{version}/files/{name}")]["responses"]
    assert "application/octet-stream" in download["200"]["content"]


def test_openapi_security_names_the_scope_of_each_operation(openapi: dict[str, Any]) -> None:
    scheme = openapi["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for name in ("submit", "admin", "serve"):
        assert f"`{name}`" in scheme["description"]
    for (method, path), operation in _operations(openapi).items():
        scope = next((s for prefix, s in SCOPE_BY_PREFIX.items() if path.startswith(prefix)), None)
        if scope is None:
            assert "security" not in operation, path
        else:
            accepted = dict.fromkeys([scope, "admin"])
            assert operation["security"] == [{"HTTPBearer": [s]} for s in accepted], (method, path)


def test_openapi_parameters_and_bodies(openapi: dict[str, Any]) -> None:
    bodies = {
        ("post", "/v1/forget-requests"): "ForgetRequestIn",
        ("post", "/v1/admin/models"): "ModelIn",
        ("post", "/v1/admin/forget-requests/{request_id}/extend"): "DeadlineExtensionIn",
        ("post", "/v1/admin/keys"): "ApiKeyIn",
        ("patch", "/v1/admin/models/{name}"): "ModelUpdateIn",
        ("post", "/v1/webhooks"): "WebhookIn",
        ("post", "/v1/forget-requests/bulk"): "BulkForgetRequestsIn",
    }
    for (method, path), operation in _operations(openapi).items():
        parameters = operation.get("parameters", [])
        in_path = {p["name"] for p in parameters if p["in"] == "path"}
        assert in_path == set(re.findall(r"{(\w+)}", path)), path
        for parameter in parameters:
            assert parameter["in"] in ("path", "query", "header"), path
            assert "schema" in parameter, path
            if parameter["in"] == "path":
                assert parameter["required"] is True, path
        if (method, path) in bodies:
            body = operation["requestBody"]
            assert body["required"] is True
            assert body["content"]["application/json"]["schema"]["$ref"].endswith("/" + bodies[method, path])
        else:
            assert "requestBody" not in operation, path
    # a field left out of a PATCH keeps its value; null is not offered (422)
    update = openapi["components"]["schemas"]["ModelUpdateIn"]["properties"]
    for name in ("method", "method_config", "settings"):
        assert "null" not in str(update[name]), update[name]
    extension = openapi["components"]["schemas"]["DeadlineExtensionIn"]["properties"]["months"]
    assert (extension["type"], extension["minimum"], extension["maximum"]) == ("integer", 1, 2)
    post = _operations(openapi)[("post", "/v1/forget-requests")]
    header = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")
    assert (header["in"], header["required"]) == ("header", True)
    assert header["schema"]["pattern"] == IDEMPOTENCY_KEY_PATTERN


def test_an_unforeseen_integrity_error_is_409(
    client: TestClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def race(*_: Any, **__: Any) -> Any:
        raise IntegrityError("INSERT ...", {}, Exception("duplicate key"))

    monkeypatch.setattr(lifecycle, "submit", race)
    response = client.post(
        "/v1/forget-requests",
        json={"model": "digits", "kind": "client", "client_id": "c0"},
        headers={**keys.submit, "Idempotency-Key": "k"},
    )
    assert "try again" in assert_problem(response, 409)["detail"]


def test_pool_exhaustion_is_503_and_health_still_answers(settings: Settings, keys: Keys) -> None:
    """Issue 9 item 5 (failed on 5a93ed6: the pool's TimeoutError became a 500 and /readyz waited
    for a pooled connection): 503 with Retry-After; /healthz and /readyz answer on their own."""
    small = settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_seconds": 0.3}
    )
    with TestClient(create_app(small)) as client:
        held = client.app.state.lethe.engine.connect()  # type: ignore[attr-defined]
        try:
            busy = client.get("/v1/forget-requests", headers=keys.submit)
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            took = time.monotonic() - started
        finally:
            held.close()
        assert client.get("/v1/forget-requests", headers=keys.submit).status_code == 200
    assert_problem(busy, 503)
    assert busy.headers["Retry-After"] == "5"
    assert ready.status_code == 200, ready.text
    assert took < 2


def test_a_statement_stuck_behind_a_lock_is_503(settings: Settings, keys: Keys, engine: Engine) -> None:
    """Issue 9 item 5 (failed on 5a93ed6: no statement timeout; a request waited as long as a 45 s
    table lock): the connection's statement_timeout ends it with 503 + Retry-After; /readyz answers."""
    if engine.dialect.name != "postgresql":
        pytest.skip("statement_timeout is PostgreSQL's")
    limited = settings.model_copy(update={"db_statement_timeout_ms": 300})
    locker = engine.connect()
    locker.execute(text("LOCK TABLE forget_requests IN ACCESS EXCLUSIVE MODE"))
    release = threading.Timer(10, locker.rollback)  # old code: the request waits for this
    release.start()
    try:
        with TestClient(create_app(limited)) as client:
            started = time.monotonic()
            stuck = client.get("/v1/forget-requests", headers=keys.submit)
            took = time.monotonic() - started
            ready = client.get("/readyz")
    finally:
        release.cancel()
        locker.rollback()
        locker.close()
    assert_problem(stuck, 503)
    assert stuck.headers["Retry-After"] == "5"
    assert took < 5
    assert ready.status_code == 200, ready.text
