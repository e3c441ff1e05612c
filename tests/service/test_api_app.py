"""Health, routing errors as problem+json, and the OpenAPI document."""

from __future__ import annotations

import socket
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
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
    down = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0", "sweep_interval_seconds": 0}
    )
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


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        "/v1/forget-requests": {"get", "post"},
        "/v1/forget-requests/{request_id}": {"get"},
        "/v1/forget-requests/{request_id}/events": {"get"},
        "/v1/forget-requests/{request_id}/evidence": {"get"},
        "/v1/admin/queue": {"get"},
        "/v1/admin/workers": {"get"},
        "/v1/admin/forget-requests/{request_id}/cancel": {"post"},
        "/v1/admin/forget-requests/{request_id}/retry": {"post"},
        "/v1/admin/models": {"get", "post"},
        "/v1/admin/models/{name}": {"get"},
        "/v1/admin/audit/verify": {"get"},
        "/v1/models/{model}/adapters/latest": {"get"},
        "/v1/models/{model}/adapters/{version}": {"get"},
        "/v1/models/{model}/adapters/{version}/files/{name}": {"get"},
        "/v1/models/{model}/base": {"get"},
        "/v1/models/{model}/base/files/{name}": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) >= methods, path
    post = paths["/v1/forget-requests"]["post"]
    header = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")
    assert header["required"] is True
    assert {"200", "201", "400", "401", "403", "404", "409", "413", "422"} <= set(post["responses"])
    for path_item in paths.values():
        for operation in path_item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (status, operation)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "field" in doc["components"]["schemas"]["Problem"]["properties"]
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    latest = paths["/v1/models/{model}/adapters/latest"]["get"]["responses"]
    assert latest["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/AdapterOut")
