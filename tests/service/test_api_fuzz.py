"""No input makes the API answer 500: seeded hostile requests against every route.

Every route (taken from the routers and checked against the OpenAPI document, so a new route is
fuzzed too) gets ``CASES`` requests from a generator seeded with the route's name: malformed and
hostile JSON (NaN, Infinity, lone surrogates, huge numbers, deep nesting, wrong types), wrong
content types and lengths, hostile path segments, query parameters and headers (Authorization,
Idempotency-Key, If-None-Match, Host). A share of near-valid requests (an admin key, a fresh key,
one hostile field at most) reaches the code behind authentication and validation. Every answer
must be below 500 and every error an RFC 9457 problem; afterwards the read endpoints must still
answer (nothing stored poisons them) and the audit chain must verify. A failure prints the case,
which the seed reproduces.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.api.app import create_app
from service.api.routers import admin, forget_requests, health, serving, webhooks
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import keys as keys_repo
from service.repositories import webhooks as webhooks_repo
from service.settings import Settings
from tests.service.helpers import assert_is_problem, client_body, task_body

CASES = 40
#: Share of near-valid cases (see :func:`near_valid_case`).
NEAR_VALID = 0.3
#: Routes that take a body get more cases: the body is where most of the hostility goes.
BODY_CASES = 120
#: Methods whose requests carry a body.
BODIES = ("POST", "PATCH")
ROUTES = sorted(
    (method, route.path_format)  # path_format: "{name}", not "{name:path}" (as OpenAPI)
    for router in (forget_requests.router, webhooks.router, admin.router, serving.router, health.router)
    for route in router.routes
    if isinstance(route, APIRoute)
    for method in route.methods or ()
)

STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff\ud800",
    "💥",
    "\u202e",
    "\u0085",
    "é",
    "\uffff",
    ".",
    "..",
    "../..",
    "..\\..\\secret.txt",
    "/etc/passwd",
    "C:\\Windows",
    "%2e%2e",
    "%00",
    "c0\n",
    "C0",
    "null",
    "' OR 1=1 --",
    "a" * 300,
    "a" * 5000,
    "0",
    "-1",
    "1e400",
    "latest",
    "digits",
    "c0",
    "s00000",
    "digit",
]
NUMBERS: list[Any] = [0, -1, 1, 2**31, 2**63, 2**70, 10**100, 1e308, -1e308, 0.5, float("nan"), float("inf")]
OTHERS: list[Any] = [None, True, False, [], {}, [[[[]]]], {"a": {"b": {}}}]
RAW_BODIES = [
    b"",
    b"{",
    b'{"model": "digits", ',
    b"\xff\xfe\x00",
    b"[" * 3000,
    b'{"model": "digits", "model": "x"}',
    b"NaN",
    b'"just a string"',
    b"{}" * 100,
]
CONTENT_TYPES = [
    "application/json",
    "application/problem+json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    ";;;==",
    "",
]
PATH_TRICKS = ["..", "%2e%2e", "%2F", ".", "%5C", "%00", "..%2F..%2Fsecret.txt", "%ff", "a/b", "%252e"]


def random_text(rng: random.Random) -> str:
    """Any code points, lone surrogates included."""
    return "".join(
        chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0, 0x10FFFF)]))
        for _ in range(rng.randint(0, 12))
    )


def hostile_string(rng: random.Random) -> str:
    return rng.choice(STRINGS) if rng.random() < 0.7 else random_text(rng)


def nested(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = {"a": leaf} if level % 2 else [leaf]
    return leaf


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return hostile_string(rng)
    if roll < 0.55:
        return rng.choice(NUMBERS)
    if roll < 0.65:
        return rng.choice(OTHERS)
    if roll < 0.72:
        return nested(rng.randint(1, 300), hostile_value(rng, depth + 1) if depth < 2 else None)
    if roll < 0.78:
        return [rng.choice(["s00000", "s00001", "c0", ""])] * rng.randint(0, 3000)
    if roll < 0.89 and depth < 3:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3:
        return {hostile_string(rng): hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return None


def hostile_object(rng: random.Random) -> dict[str, Any]:
    """A JSON object that passes a ``dict`` type check: deep, or with hostile keys and values."""
    if rng.random() < 0.3:
        deep: dict[str, Any] = {}
        for _ in range(rng.randint(1, 400)):
            deep = {"a": deep}
        return deep
    values = [*NUMBERS, *OTHERS, "\ud800", "\x00"]
    return {hostile_string(rng): rng.choice(values) for _ in range(rng.randint(1, 3))}


def mutated_value(rng: random.Random, value: Any, same_type: float = 0.5) -> Any:
    """Often of ``value``'s type (to get past the schema's type check), else anything."""
    if rng.random() >= same_type:
        return hostile_value(rng)
    if isinstance(value, dict):
        return hostile_object(rng)
    if isinstance(value, list):
        return [hostile_string(rng) for _ in range(rng.randint(0, 5))]
    return hostile_string(rng)


def header_value(text: str) -> bytes:
    """As a client could send it (a server refuses CR and LF before the application sees them)."""
    return text.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")


@dataclass
class World:
    """What exists when the fuzzing starts; valid values make requests reach deeper code."""

    keys: dict[str, str]
    request_ids: list[str]
    models: list[str] = field(default_factory=lambda: ["digits", "nope"])
    versions: list[str] = field(default_factory=lambda: ["1", "2", "latest"])
    files: list[str] = field(default_factory=lambda: ["adapter_model.safetensors", "model.safetensors"])
    #: a spare key's id (revoking or rotating it leaves the world's keys working) and an unknown one
    key_ids: list[str] = field(default_factory=lambda: ["999"])
    #: a webhook of the submit key with one delivery, and unknown ids
    webhook_ids: list[str] = field(default_factory=lambda: ["nope"])
    delivery_ids: list[str] = field(default_factory=lambda: ["msg_nope"])


@dataclass
class Case:
    method: str
    url: str
    headers: dict[str, bytes]
    content: bytes | None

    def __str__(self) -> str:
        body = self.content[:300] if self.content is not None else None
        return f"{self.method} {self.url[:300]} headers={self.headers} body={body!r}"


def valid_body(rng: random.Random, path: str) -> dict[str, Any]:
    if path == "/v1/webhooks":
        events = ["forget_request.completed", "forget_request.failed", "certification.finished"]
        return {"url": rng.choice(["https://example.com/hook", "http://127.0.0.1/x"]), "events": events}
    if path.endswith("/extend"):
        return {"months": rng.choice([1, 2]), "reason": "many linked datasets"}
    if path == "/v1/admin/keys":
        return {"scopes": rng.sample(["submit", "serve", "admin"], rng.randint(1, 3)), "name": "fuzz"}
    if path == "/v1/admin/models/{name}":
        return {"method": rng.choice(["ssd", "default"]), "method_config": {}, "settings": {}}
    if path == "/v1/admin/models":
        return {
            "name": f"m-{rng.randint(0, 10**6)}",
            "workload": "digits-clients",
            "method": "ssd",
            "method_config": {"alpha": 1.0},
            "settings": {},
        }
    if path == "/v1/forget-requests/bulk":  # items valid or hostile one by one
        items = [
            {
                "idempotency_key": f"bulk-{rng.getrandbits(32)}",
                "request": valid_body(rng, "/v1/forget-requests"),
            }
            for _ in range(rng.randint(1, 4))
        ]
        return {"items": [mutated(rng, item) if rng.random() < 0.3 else item for item in items]}
    client = f"c{rng.randint(0, 3)}"
    return client_body(client) if rng.random() < 0.5 else task_body([f"s0000{rng.randint(0, 9)}"], ["digit"])


def mutated(rng: random.Random, body: dict[str, Any]) -> Any:
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.6 and body:
            name = rng.choice(sorted(body))
            body[name] = mutated_value(rng, body[name])
        elif roll < 0.8 and body:
            body.pop(rng.choice(sorted(body)))
        elif roll < 0.9:
            body[hostile_string(rng)] = hostile_value(rng)
        else:
            return hostile_value(rng)
    return body


def body_bytes(rng: random.Random, path: str) -> bytes | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    if roll < 0.15:
        return rng.choice(RAW_BODIES)
    body = valid_body(rng, path) if roll < 0.4 else mutated(rng, valid_body(rng, path))
    # NaN / Infinity as literals and lone surrogates as \ud800 escapes, as a lenient client sends them.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode("ascii")


def path_value(rng: random.Random, name: str, world: World, hostile: float = 0.5) -> str:
    roll = rng.random()
    if roll >= hostile:
        pool = {
            "request_id": world.request_ids,
            "model": world.models,
            "name": world.files + world.models,
            "version": world.versions,
            "key_id": world.key_ids,
            "webhook_id": world.webhook_ids,
            "delivery_id": world.delivery_ids,
        }[name]
        return quote(rng.choice(pool), safe="")
    if roll < hostile * 0.4:
        return rng.choice(PATH_TRICKS)
    return quote(hostile_string(rng).encode("utf-8", "surrogatepass"), safe="")


def query(rng: random.Random) -> str:
    values: dict[str, Callable[[], str]] = {
        "status": lambda: rng.choice(["queued", "completed", "done", "", "QUEUED"]),
        "model": lambda: rng.choice(["digits", "nope", "Bad Name"]),
        "cursor": lambda: rng.choice(
            ["", "!!", "c2VxOjE", "c2VxOi0x", "=" * 10, "%ff%fe", "c2VxOjk5OTk5OTk5OTk5"]
        ),
        "limit": lambda: rng.choice(["0", "-1", "1", "200", "201", "1e9", "abc", str(2**64)]),
        "unknown": lambda: "1",
    }
    chosen = [name for name in values if rng.random() < 0.4]
    return "&".join(f"{name}={quote(values[name]())}" for name in chosen)


def authorization(rng: random.Random, world: World) -> bytes | None:
    roll = rng.random()
    if roll < 0.4:
        return header_value(f"Bearer {world.keys['admin']}")
    if roll < 0.65:
        return header_value(f"Bearer {world.keys[rng.choice(['submit', 'serve'])]}")
    if roll < 0.75:
        return None
    return header_value(
        rng.choice(
            [
                f"Bearer {hostile_string(rng)}",
                f"bearer {world.keys['admin']}",
                f"Bearer {world.keys['admin']}x",
                f"Basic {world.keys['admin']}",
                "Bearer",
                "Bearer ",
                hostile_string(rng),
            ]
        )
    )


def near_valid_case(rng: random.Random, method: str, path: str, world: World) -> Case:
    """A valid admin request with one hostile field at most, mostly of the right type, so that
    the code behind authentication and validation runs (subjects, the registry, serving, the queue)."""
    url = path
    for name in ("request_id", "model", "version", "name", "webhook_id", "delivery_id"):
        url = url.replace("{" + name + "}", path_value(rng, name, world, hostile=0.1))
    headers = {
        "Authorization": header_value(f"Bearer {world.keys['admin']}"),
        "Idempotency-Key": header_value(f"fresh-{rng.getrandbits(64)}"),
        "Content-Type": b"application/json",
    }
    body = valid_body(rng, path)
    if rng.random() < 0.8:
        name = rng.choice(sorted(body))
        body[name] = mutated_value(rng, body[name], same_type=0.8)
    content = json.dumps(body, ensure_ascii=True, allow_nan=True).encode() if method in BODIES else None
    return Case(method, url, headers, content)


def make_case(rng: random.Random, method: str, path: str, world: World) -> Case:
    if rng.random() < NEAR_VALID:
        return near_valid_case(rng, method, path, world)
    url = path
    for name in ("request_id", "model", "version", "name", "webhook_id", "delivery_id"):
        if "{" + name + "}" in url:
            url = url.replace("{" + name + "}", path_value(rng, name, world))
    if rng.random() < 0.5:
        url += "?" + query(rng)
    headers: dict[str, bytes] = {}
    if (auth := authorization(rng, world)) is not None:
        headers["Authorization"] = auth
    if rng.random() < 0.85:
        key = f"k-{rng.randint(0, 50)}" if rng.random() < 0.7 else hostile_string(rng)
        headers["Idempotency-Key"] = header_value(key)
    if rng.random() < 0.3:
        headers["If-None-Match"] = header_value(rng.choice(["*", '"x"', 'W/"x"', ",,,", hostile_string(rng)]))
    content = body_bytes(rng, path) if method in BODIES or rng.random() < 0.1 else None
    content_type = "application/json" if rng.random() < 0.6 else rng.choice(CONTENT_TYPES)
    if content is not None and content_type:
        headers["Content-Type"] = content_type.encode()
    if rng.random() < 0.05:
        headers["Host"] = header_value(
            rng.choice(["[::1", "a b", "x:99999999", "", "a/b?c#d", hostile_string(rng)])
        )
    if rng.random() < 0.03:
        headers["Content-Length"] = rng.choice([b"abc", b"-5", b"99999999999999999999", b"0"])
    return Case(method, url, headers, content)


def check(response: Any, case: Case) -> None:
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case}"
    if case.method == "HEAD":  # GET's headers, no body
        assert response.content == b"", str(case)
        if response.status_code >= 400:
            assert response.headers["content-type"] == "application/problem+json", str(case)
        return
    if response.status_code >= 400:
        try:
            assert_is_problem(response)
        except AssertionError as error:
            raise AssertionError(f"not a problem: {error}\n{case}") from None
    elif response.status_code in (200, 201):
        content_type = response.headers["content-type"]
        assert content_type in ("application/json", "application/octet-stream"), (content_type, str(case))
        if content_type == "application/json":
            response.json()


@pytest.fixture
def lenient_client(settings: Settings) -> Iterator[TestClient]:
    """A client that answers a server error as the 500 response a caller would get (the bad-key
    throttle is off: the fuzzer sends many bad keys and must reach deeper code)."""
    lenient = settings.model_copy(update={"auth_failure_limit": 1_000_000})
    with TestClient(create_app(lenient), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def world(settings: Settings, sessions: sessionmaker[Session], ready_model: str, client: TestClient) -> World:
    """digits with its files on disk, a queued and a failed request, one key per scope."""
    root = settings.resolved_artifacts_dir
    for relative in ("digits/adapters/v1/adapter_model.safetensors", "digits/base/model.safetensors"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    keys = {}
    with transaction(sessions) as session:
        for scope in ("submit", "serve", "admin"):
            keys[scope] = keys_repo.create_key(session, [scope])[1]
        spare = keys_repo.create_key(session, ["serve"], name="spare")[0].id
    submit = {"Authorization": f"Bearer {keys['submit']}"}
    ids = []
    for client_id in ("c0", "c1"):
        response = client.post(
            "/v1/forget-requests",
            json=client_body(client_id),
            headers={**submit, "Idempotency-Key": client_id},
        )
        ids.append(response.json()["id"])
    with transaction(sessions) as session:
        claimed = rounds.claim_round(session, "digits", "w", lease_seconds=60, max_requests=1, max_attempts=3)
        assert claimed is not None
        rounds.fail_round(session, claimed, error="boom", retryable=False)
    hook = client.post("/v1/webhooks", json={"url": "https://example.com/hook"}, headers=submit)
    assert hook.status_code == 201, hook.text
    with transaction(sessions) as session:
        delivery = webhooks_repo.add_delivery(
            session,
            delivery_id="msg_world",
            webhook_id=hook.json()["id"],
            event="forget_request.failed",
            payload={"type": "forget_request.failed", "data": {"request_id": ids[0]}},
            at=utcnow(),
        )
        session.flush()
        assert delivery.id == "msg_world"
    return World(
        keys=keys,
        request_ids=[*ids, "0" * 8 + "-0000-0000-0000-" + "0" * 12],
        key_ids=[str(spare), "999"],
        webhook_ids=[hook.json()["id"], "nope"],
        delivery_ids=["msg_world", "msg_nope"],
    )


def assert_reads_still_work(client: TestClient, world: World) -> None:
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    for url in ("/v1/admin/models", "/v1/admin/queue", "/v1/admin/workers", "/v1/admin/models/digits"):
        assert client.get(url, headers=admin).status_code == 200, url
    models = [m["name"] for m in client.get("/v1/admin/models", headers=admin).json()]
    for name in models:
        assert client.get(f"/v1/admin/models/{name}", headers=admin).status_code == 200, name
    params: dict[str, Any] = {"limit": 200}
    while params:
        page = client.get("/v1/forget-requests", params=params, headers=admin)
        assert page.status_code == 200, page.text
        for item in page.json()["items"]:
            for suffix in ("", "/events", "/evidence"):
                assert (
                    client.get(f"/v1/forget-requests/{item['id']}{suffix}", headers=admin).status_code == 200
                )
        cursor = page.json()["next_cursor"]
        params = {"limit": 200, "cursor": cursor} if cursor else {}
    report = client.get("/v1/admin/audit/verify", headers=admin).json()
    assert report["ok"], report


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_no_input_makes_it_answer_500(
    lenient_client: TestClient, world: World, method: str, path: str
) -> None:
    client = lenient_client
    rng = random.Random(f"{method} {path}")
    statuses: dict[int, int] = {}
    for _ in range(
        BODY_CASES if path in ("/v1/forget-requests", "/v1/admin/models") and method in BODIES else CASES
    ):
        case = make_case(rng, method, path, world)
        headers = {name.encode(): value for name, value in case.headers.items()}
        response = client.request(case.method, case.url, headers=headers, content=case.content)
        check(response, case)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert_reads_still_work(client, world)
    # The generator must not only bounce off authentication or validation.
    if path not in ("/healthz", "/readyz"):
        assert any(status < 400 or status in (404, 409, 410) for status in statuses), statuses


def test_every_operation_is_fuzzed_and_documented() -> None:
    doc = create_app(Settings(database_url="sqlite://")).openapi()
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert documented == set(ROUTES)
