"""HTTP conformance (issue 9, item 15): Allow on 405, one problem type for a body that is not JSON,
authentication before body parsing, the forget request as a discriminated union, the server's own
400s as problem+json, HEAD on the file routes."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service import cli, rounds
from service.api.app import create_app
from service.api.wire import ProblemHttpToolsProtocol
from service.db.session import transaction
from service.repositories import models as models_repo
from service.settings import Settings
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, uvicorn_in_thread

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/forget-requests", "GET, POST"),
        ("PUT", "/v1/admin/models", "GET, POST"),
        ("DELETE", "/v1/models/digits/adapters/1/files/a", "GET, HEAD"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_allows_every_method_of_the_path(
    client: TestClient, keys: Keys, method: str, path: str, allow: str
) -> None:
    """Defect: ``Allow`` named one route's methods (``POST`` for /v1/forget-requests, which GET
    answers too)."""
    response = client.request(method, path, headers=keys.admin)
    assert_problem(response, 405)
    assert response.headers["allow"] == allow


BAD_BODIES = [b'{"model": ', b"\xff\xfe{}", b"[" * 3000]


@pytest.mark.parametrize("content", BAD_BODIES, ids=["truncated", "not-utf8", "too-deep"])
@pytest.mark.parametrize("path", ["/v1/forget-requests", "/v1/admin/models"])
def test_a_body_that_is_not_json_is_one_problem_type(
    client: TestClient, keys: Keys, path: str, content: bytes
) -> None:
    """Defect: a body the parser refused (invalid UTF-8, nesting too deep) was ``about:blank`` with
    FastAPI's text, a truncated one ``…/bad-json``: now always ``…/bad-json``."""
    headers = {**keys.admin, **JSON, "Idempotency-Key": "k"}
    problem = assert_problem(client.post(path, content=content, headers=headers), 400)
    assert problem["type"] == "https://lethe.dev/problems/bad-json", problem


@pytest.mark.parametrize("content", [BAD_BODIES[0], BAD_BODIES[1]], ids=["truncated", "not-utf8"])
def test_a_body_that_is_not_json_is_answered_after_authentication(
    client: TestClient, keys: Keys, content: bytes
) -> None:
    """Defect: malformed JSON answered 400 to a caller without a key (authentication came after
    body parsing); now 401 without a key, 403 without the scope, 400 only to an authorised caller."""
    url = "/v1/admin/models"
    assert_problem(client.post(url, content=content, headers=JSON), 401)
    wrong = {**JSON, "Authorization": "Bearer lethe_unknown"}
    assert_problem(client.post(url, content=content, headers=wrong), 401)
    assert_problem(client.post(url, content=content, headers={**JSON, **keys.submit}), 403)
    assert_problem(client.post(url, content=content, headers={**JSON, **keys.admin}), 400)
    submit = {**JSON, **keys.submit, "Idempotency-Key": "k"}
    assert_problem(client.post("/v1/forget-requests", content=content, headers={**submit, **JSON}), 400)
    assert_problem(client.post("/v1/forget-requests", content=content, headers=JSON), 401)


BODY_ROUTES = [
    ("POST", "/v1/forget-requests"),
    ("POST", "/v1/forget-requests/bulk"),
    ("POST", "/v1/webhooks"),
    ("POST", "/v1/admin/models"),
    ("PATCH", "/v1/admin/models/digits"),
    ("POST", "/v1/admin/keys"),
    ("POST", "/v1/admin/forget-requests/00000000-0000-4000-8000-000000000000/extend"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_json_sent_as_another_media_type_is_415(
    client: TestClient, keys: Keys, method: str, path: str, content_type: str | None
) -> None:
    """Defect: valid JSON sent as ``text/plain`` or without a Content-Type was a 422 "request:
    Input should be a valid dictionary or object to extract fields from", field ``""``."""
    headers = {
        **keys.admin,
        "Idempotency-Key": "k",
        **({"Content-Type": content_type} if content_type else {}),
    }
    response = client.request(method, path, content=b'{"months": 1, "reason": "x"}', headers=headers)
    problem = assert_problem(response, 415, field="Content-Type")
    assert "application/json" in problem["detail"], problem
    assert problem["type"] == "https://lethe.dev/problems/unsupported-media-type"
    assert response.headers[f"accept-{method.lower()}"] == "application/json"
    # authentication still comes first
    anonymous = {k: v for k, v in headers.items() if k != "Authorization"}
    assert_problem(client.request(method, path, content=b"{}", headers=anonymous), 401)


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_missing_body_is_named(client: TestClient, keys: Keys, method: str, path: str) -> None:
    """Defect: no body at all was 422 "request: Field required"."""
    for headers in ({**JSON}, {}):
        response = client.request(method, path, headers={**keys.admin, "Idempotency-Key": "k", **headers})
        problem = assert_problem(response, 422)
        assert problem["detail"].startswith("the body is missing"), problem
        assert problem["errors"][0]["message"].startswith("the body is missing"), problem


def test_a_body_that_is_not_json_without_a_database_is_503(tmp_path: Path) -> None:
    """Authenticating first must not turn a database outage into a 500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://lethe@127.0.0.1:{port}/lethe?connect_timeout=2"
    with TestClient(create_app(Settings(home=tmp_path, database_url=url))) as client:
        headers = {**JSON, "Authorization": "Bearer lethe_x"}
        response = client.post("/v1/admin/models", content=b"{", headers=headers)
    assert_problem(response, 503)


def test_the_forget_request_body_is_a_discriminated_union(client: TestClient) -> None:
    """Defect: one schema with every field optional: the kind-dependent fields were invisible in
    OpenAPI. Now a union discriminated by ``kind`` whose members require their fields."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    body = schemas["ForgetRequestIn"]
    assert body["discriminator"]["propertyName"] == "kind"
    members = {kind: ref.rsplit("/", 1)[1] for kind, ref in body["discriminator"]["mapping"].items()}
    assert members == {"client": "ClientForgetRequestIn", "task": "TaskForgetRequestIn"}
    assert [m["$ref"].rsplit("/", 1)[1] for m in body["oneOf"]] == list(members.values())
    client_schema, task_schema = schemas["ClientForgetRequestIn"], schemas["TaskForgetRequestIn"]
    assert set(client_schema["required"]) == {"model", "kind", "client_id"}
    assert "sample_ids" not in client_schema["properties"]
    assert set(task_schema["required"]) == {"model", "kind", "sample_ids", "tasks"}
    assert "client_id" not in task_schema["properties"]
    assert client_schema["additionalProperties"] is task_schema["additionalProperties"] is False


@pytest.mark.usefixtures("ready_model")
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "digits", "kind": "client"}, "client_id"),
        ({"model": "digits", "kind": "task", "sample_ids": ["s00000"]}, "tasks"),
        ({"model": "digits", "kind": "client", "client_id": "c0", "sample_ids": ["s00000"]}, "sample_ids"),
        (
            {"model": "digits", "kind": "task", "client_id": "c0", "sample_ids": ["s0"], "tasks": ["d"]},
            "client_id",
        ),
        ({"model": "digits", "client_id": "c0"}, "kind"),
        ({"model": "digits", "kind": ["client"], "client_id": "c0"}, "kind"),
    ],
)
def test_kind_dependent_fields_are_named(client: TestClient, keys: Keys, body: Any, field: str) -> None:
    """The union's errors name the field (not the member's tag)."""
    headers = {**keys.submit, "Idempotency-Key": "k"}
    assert_problem(client.post("/v1/forget-requests", json=body, headers=headers), 422, field=field)


@pytest.fixture
def wire_server(settings: Settings) -> Iterator[int]:
    """The API on uvicorn with the protocol ``lethe serve`` uses; yields the port."""
    with uvicorn_in_thread(settings, http=ProblemHttpToolsProtocol) as port:
        yield port


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1, 2"])
def test_a_bad_content_length_is_a_problem_on_the_server(wire_server: int, length: bytes) -> None:
    """Defect: uvicorn refused a non-numeric ``Content-Length`` itself, as ``text/plain``."""
    request = b"POST /v1/forget-requests HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}"
    head, _, body = _raw(wire_server, request).partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 400"), lines
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert (problem["status"], problem["title"]) == (400, "Bad Request")


def test_lethe_serve_runs_the_problem_protocol(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setenv("LETHE_HOME", str(tmp_path))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli.main, ["serve", "--port", "1"])
    assert result.exit_code == 0, result.output
    assert seen["http"] is ProblemHttpToolsProtocol


@pytest.fixture
def served_files(settings: Settings, sessions: sessionmaker[Session]) -> dict[str, bytes]:
    root = settings.resolved_artifacts_dir
    contents = {"digits/adapters/0-1/adapter_model.safetensors": b"v1", "digits/base/model.safetensors": b"b"}
    digests = {}
    for relative, content in contents.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
        digests[relative] = rounds.FileDigest(hashlib.sha256(content).hexdigest(), len(content))
    with transaction(sessions) as session:
        models_repo.create_model(session, "digits", workload="w", method="ssd", method_config={}, settings={})
        rounds.register_prepared_model(
            session,
            "digits",
            subjects={"c0": ["s00000"]},
            location="digits/adapters/0-1",
            files={"adapter_model.safetensors": digests["digits/adapters/0-1/adapter_model.safetensors"]},
            evidence={},
            tasks=["digit"],
            base_location="digits/base",
            base_files={"model.safetensors": digests["digits/base/model.safetensors"]},
        )
    return {
        "/v1/models/digits/adapters/1/files/adapter_model.safetensors": b"v1",
        "/v1/models/digits/base/files/model.safetensors": b"b",
    }


def test_head_on_the_file_routes_answers_the_headers_of_get(
    client: TestClient, keys: Keys, served_files: dict[str, bytes]
) -> None:
    """Defect: HEAD on a file route answered 405."""
    for url, content in served_files.items():
        get = client.get(url, headers=keys.serve)
        head = client.head(url, headers=keys.serve)
        assert (get.status_code, head.status_code) == (200, 200), url
        assert get.content == content
        assert head.content == b""
        for name in ("etag", "repr-digest", "x-checksum-sha256", "content-length", "content-type"):
            assert head.headers[name] == get.headers[name], (url, name)
        cached = client.head(url, headers={**keys.serve, "If-None-Match": get.headers["etag"]})
        assert cached.status_code == 304
        assert client.head(url).status_code == 401
        assert client.head(url.replace("files/", "files/x"), headers=keys.serve).status_code == 404
