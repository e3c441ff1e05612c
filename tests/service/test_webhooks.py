"""Webhooks (issue 10 part 4): registration, the outbox written with the state change it reports,
signed delivery to a real HTTP receiver with retries, the delivery log and replay."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service import certification, rounds
from service.api.app import create_app
from service.db.models import Webhook, WebhookDelivery
from service.db.session import transaction
from service.db.types import utcnow
from service.settings import Settings
from service.webhooks.addresses import is_public
from service.webhooks.sender import Sender, SenderThread
from service.webhooks.signing import SecretBox, new_secret, signature
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body

DIGEST = rounds.FileDigest(sha256="0" * 64, size=1)


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance: int = 300) -> dict[str, Any]:
    """The receiver example of docs/api.md: check the signature and the timestamp, then parse."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        raise ValueError("timestamp too old or in the future")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    received = [s.removeprefix("v1,") for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    if not any(hmac.compare_digest(expected, s) for s in received):
        raise ValueError("bad signature")
    payload: dict[str, Any] = json.loads(body)
    return payload


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 (a thread): answers with ``codes`` in turn (then 204)."""

    url: str
    codes: queue.Queue[int] = field(default_factory=queue.Queue)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    got: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            box[0].received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            try:
                code = box[0].codes.get_nowait()
            except queue.Empty:
                code = 204
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            box[0].got.set()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hooks"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    """Loopback allowed (the receiver runs on 127.0.0.1), retries due at once."""
    return settings.model_copy(
        update={
            "webhook_allow_private_addresses": True,
            "webhook_retry_base_seconds": 0.0,
            "webhook_timeout_seconds": 5.0,
        }
    )


@pytest.fixture
def hook_client(hook_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hook_settings)) as test_client:
        yield test_client


@pytest.fixture
def sender(sessions: sessionmaker[Session], hook_settings: Settings) -> Iterator[Sender]:
    made = Sender(sessions, hook_settings)
    yield made
    made.close()


def register(client: TestClient, headers: dict[str, str], url: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **body}, headers=headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def submit(client: TestClient, headers: dict[str, str], client_id: str = "c0") -> str:
    response = client.post(
        "/v1/forget-requests",
        json=client_body(client_id),
        headers={**headers, "Idempotency-Key": f"k-{client_id}-{headers['Authorization'][-6:]}"},
    )
    assert response.status_code in (200, 201), response.text
    request_id: str = response.json()["id"]
    return request_id


def claim(factory: sessionmaker[Session]) -> rounds.ClaimedRound:
    with transaction(factory) as session:
        claimed = rounds.claim_round(
            session, "digits", "w1", lease_seconds=60, max_requests=4, max_attempts=3
        )
    assert claimed is not None
    return claimed


def publish(factory: sessionmaker[Session], claimed: rounds.ClaimedRound) -> rounds.PublishedVersion:
    with transaction(factory) as session:
        return rounds.publish_round(
            session,
            claimed,
            location=f"digits/adapters/{claimed.round_id}",
            files={"adapter_model.safetensors": DIGEST},
            evidence={r.id: {"auc": 0.5} for r in claimed.requests},
            withdraw_versions=[1],
        )


def deliveries(factory: sessionmaker[Session]) -> list[WebhookDelivery]:
    with transaction(factory) as session:
        rows = list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))
        session.expunge_all()
        return rows


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    """The signature scheme is Standard Webhooks' (its published example), not a look-alike."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_secrets_are_stored_encrypted_and_bound_to_their_webhook() -> None:
    box = SecretBox(b"server key")
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:])) == 32
    sealed = box.seal(secret, webhook_id="a")
    assert secret not in sealed
    assert secret[6:] not in sealed
    assert box.open(sealed, webhook_id="a") == secret
    with pytest.raises(InvalidTag):
        box.open(sealed, webhook_id="b")  # copied to another row
    with pytest.raises(InvalidTag):
        SecretBox(b"another key").open(sealed, webhook_id="a")


def test_the_webhook_key_comes_from_the_setting_or_a_private_file(tmp_path: Path) -> None:
    """An empty or short LETHE_WEBHOOK_SECRET_KEY is refused (it would encrypt with a guessable key);
    unset, a random key file (0600) is created once and reused by every process sharing the home."""
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, webhook_secret_key="")
    sealed = SecretBox.from_settings(Settings(home=tmp_path)).seal("whsec_x", webhook_id="w")
    key_file = tmp_path / "webhook-secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert SecretBox.from_settings(Settings(home=tmp_path)).open(sealed, webhook_id="w") == "whsec_x"
    configured = Settings(home=tmp_path, webhook_secret_key="k" * 16)
    with pytest.raises(InvalidTag):
        SecretBox.from_settings(configured).open(sealed, webhook_id="w")


def test_register_shows_the_secret_once_and_scopes_webhooks_to_their_key(
    hook_client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    created = register(hook_client, keys.submit, "https://example.com/hook", events=["forget_request.failed"])
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["forget_request.failed"]
    with transaction(sessions) as session:
        stored = session.get(Webhook, created["id"])
        assert stored is not None
        assert created["secret"] not in stored.secret_ciphertext
    listed = hook_client.get("/v1/webhooks", headers=keys.submit).json()
    assert [h["id"] for h in listed] == [created["id"]]
    assert "secret" not in listed[0]
    one = hook_client.get(f"/v1/webhooks/{created['id']}", headers=keys.submit).json()
    assert "secret" not in one
    assert one["url"] == "https://example.com/hook"
    assert hook_client.get("/v1/webhooks", headers=keys.other_submit).json() == []
    assert_problem(hook_client.get(f"/v1/webhooks/{created['id']}", headers=keys.other_submit), 404)
    assert_problem(hook_client.delete(f"/v1/webhooks/{created['id']}", headers=keys.other_submit), 404)
    assert_problem(hook_client.get("/v1/webhooks", headers=keys.serve), 403)
    default = register(hook_client, keys.other_submit, "https://example.com/all")
    assert sorted(default["events"]) == [
        "certification.finished",
        "forget_request.completed",
        "forget_request.failed",
    ]
    assert hook_client.delete(f"/v1/webhooks/{created['id']}", headers=keys.submit).status_code == 204
    assert_problem(hook_client.get(f"/v1/webhooks/{created['id']}", headers=keys.submit), 404)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "https://",
        "example.com/hook",
        "https://user:pw@example.com/x",
        "https://example.com/x#frag",
        "https://exa mple.com/x",
        "https://example.com:99999/x",
        "http://127.0.0.1/x",
        "http://127.1.2.3:8080/x",
        "http://localhost/x",
        "http://api.localhost/x",
        "http://[::1]/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://10.0.0.1/x",
        "http://192.168.1.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/x",
        "http://0.0.0.0/x",
        # 127.0.0.1 as the resolver reads it (inet_aton): registered, then never deliverable (defect)
        "https://0x7f000001/h",
        "https://2130706433/h",
        "https://127.1/h",
        "https://017700000001/h",
        "https://0x7f.0.0.1/h",
        "https://0177.0.0.01/h",
        "https://127.0.1/h",
        "https://2130706433./h",
        "https://0/h",
        "https://0xa000001/h",  # 10.0.0.1
        "https://3232235777:8443/h",  # 192.168.1.1
    ],
)
def test_urls_that_are_not_http_or_not_public_are_refused(client: TestClient, keys: Keys, url: str) -> None:
    """SSRF and scheme checks at registration (the default settings refuse private addresses)."""
    assert_problem(client.post("/v1/webhooks", json={"url": url}, headers=keys.submit), 422, field="url")


def test_numeric_host_forms_are_judged_by_the_address_they_stand_for(
    client: TestClient, hook_client: TestClient, keys: Keys
) -> None:
    """A host such as ``2130706433`` is the address inet_aton reads it as: the message names it; a
    public one (``134744072`` is 8.8.8.8) is registered, and with private addresses allowed so is
    a loopback one."""
    refused = client.post("/v1/webhooks", json={"url": "https://2130706433/h"}, headers=keys.submit)
    problem = assert_problem(refused, 422, field="url")
    assert "is the address 127.0.0.1, which is not a public address" in problem["detail"], problem
    assert "not a public address" in problem["detail"], problem
    assert register(client, keys.submit, "https://134744072/h")["url"] == "https://134744072/h"
    assert register(hook_client, keys.other_submit, "https://0x7f000001/h")["url"] == "https://0x7f000001/h"


def test_bad_bodies_and_the_per_key_limit_are_4xx(settings: Settings, keys: Keys) -> None:
    limited = settings.model_copy(update={"webhook_max_per_key": 1})
    with TestClient(create_app(limited)) as client:
        for body in (
            {"url": "https://example.com/x", "events": []},
            {"url": "https://example.com/x", "events": ["nope"]},
            {"url": "https://example.com/x", "events": ["forget_request.failed"] * 2},
            {"url": "https://example.com/x", "secret": "mine"},
            {"url": 5},
            {},
        ):
            assert_problem(client.post("/v1/webhooks", json=body, headers=keys.submit), 422)
        register(client, keys.submit, "https://example.com/x")
        assert_problem(client.post("/v1/webhooks", json={"url": "https://e.com/y"}, headers=keys.submit), 409)
        assert_problem(client.get("/v1/webhooks/nope/deliveries?limit=0", headers=keys.submit), 422)
        assert_problem(client.post("/v1/webhooks/nope/deliveries/msg_x/replay", headers=keys.submit), 404)


def test_a_signed_delivery_arrives_after_a_retry_and_replay_resends_it(
    hook_client: TestClient,
    keys: Keys,
    ready_model: str,
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: Sender,
) -> None:
    """The issue's acceptance test: first attempt 500, the retry is received and verified; the log
    shows both attempts; replay sends the same message again."""
    hook = register(hook_client, keys.submit, receiver.url)
    request_id = submit(hook_client, keys.submit)
    assert deliveries(sessions) == []
    publish(sessions, claim(sessions))
    [queued] = deliveries(sessions)
    assert (queued.status, queued.event) == ("pending", "forget_request.completed")

    receiver.codes.put(500)
    [first] = sender.run_once()
    assert (first.status_code, first.ok) == (500, False)
    assert len(receiver.received) == 1
    log = hook_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=keys.submit).json()["items"]
    assert [(d["status"], d["attempts"]) for d in log] == [("pending", 1)]
    assert [a["status_code"] for a in log[0]["log"]] == [500]

    [second] = sender.run_once()  # the backoff is 0 here: due at once
    assert second.ok
    headers, body = receiver.received[1]
    payload = verify(hook["secret"], headers, body)
    assert payload["type"] == "forget_request.completed"
    assert payload["data"] == {
        "request_id": request_id,
        "status": "completed",
        "model": "digits",
        "version": 2,
        "round_id": payload["data"]["round_id"],
    }
    assert b'"c0"' not in body  # no subject id
    assert headers["webhook-id"] == receiver.received[0][0]["webhook-id"] == queued.id
    with pytest.raises(ValueError, match="bad signature"):
        verify(hook["secret"], headers, body + b" ")
    assert sender.run_once() == []  # delivered: nothing due

    log = hook_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=keys.submit).json()["items"]
    assert log[0]["status"] == "delivered"
    assert log[0]["delivered_at"] is not None
    assert [(a["status_code"], a["error"]) for a in log[0]["log"]] == [(500, "HTTP 500"), (204, None)]
    assert log[0]["payload"] == payload

    # the ids in any case (they are stored lower-case)
    replay_url = f"/v1/webhooks/{hook['id'].upper()}/deliveries/{queued.id.upper()}/replay"
    replay = hook_client.post(replay_url, headers=keys.submit)
    assert replay.status_code == 202, replay.text
    assert (replay.json()["status"], replay.json()["attempts"]) == ("pending", 0)
    assert len(receiver.received) == 2  # the API does not send: a worker does
    [third] = sender.run_once()
    assert third.ok
    headers, body = receiver.received[2]
    assert headers["webhook-id"] == queued.id
    assert verify(hook["secret"], headers, body) == payload
    log = hook_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=keys.submit).json()["items"]
    assert [a["status_code"] for a in log[0]["log"]] == [500, 204, 204]
    assert_problem(
        hook_client.post(
            f"/v1/webhooks/{hook['id']}/deliveries/{queued.id}/replay", headers=keys.other_submit
        ),
        404,
    )


def test_a_failure_for_good_is_queued_in_the_same_transaction(
    hook_client: TestClient, keys: Keys, ready_model: str, sessions: sessionmaker[Session]
) -> None:
    """forget_request.failed: written by ``_fail_for_good`` in its transaction (a rollback leaves no
    delivery), with the cause and no error text."""
    register(hook_client, keys.submit, "https://example.com/hook", events=["forget_request.failed"])
    request_id = submit(hook_client, keys.submit)
    claimed = claim(sessions)
    session = sessions()
    try:
        rounds.fail_round(session, claimed, error="boom for c0 / s00001", retryable=False)
        session.flush()
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        session.rollback()
    finally:
        session.close()
    assert deliveries(sessions) == []
    with transaction(sessions) as session:
        rounds.fail_round(session, claimed, error="boom for c0 / s00001", retryable=False)
    [row] = deliveries(sessions)
    assert row.event == "forget_request.failed"
    assert row.payload["data"] == {
        "request_id": request_id,
        "status": "failed",
        "model": "digits",
        "cause": "permanent",
        "attempts": 1,
        "crashes": 0,
    }
    assert '"c0"' not in json.dumps(row.payload)
    assert "boom" not in json.dumps(row.payload)
    hook_id = row.webhook_id
    assert hook_client.delete(f"/v1/webhooks/{hook_id}", headers=keys.submit).status_code == 204
    assert deliveries(sessions) == []  # deleted with their webhook


def test_only_subscribed_events_of_the_submitting_key_are_queued(
    hook_client: TestClient, keys: Keys, ready_model: str, sessions: sessionmaker[Session]
) -> None:
    register(hook_client, keys.submit, "https://example.com/failed", events=["forget_request.failed"])
    other = register(hook_client, keys.other_submit, "https://example.com/other")
    submit(hook_client, keys.submit, "c0")
    other_id = submit(hook_client, keys.other_submit, "c1")
    publish(sessions, claim(sessions))
    [row] = deliveries(sessions)
    assert (row.webhook_id, row.event, row.payload["data"]["request_id"]) == (
        other["id"],
        "forget_request.completed",
        other_id,
    )


def test_a_merged_request_is_reported_to_its_own_submitter(
    hook_client: TestClient, keys: Keys, ready_model: str, sessions: sessionmaker[Session]
) -> None:
    first_hook = register(hook_client, keys.submit, "https://example.com/a")
    second_hook = register(hook_client, keys.other_submit, "https://example.com/b")
    first = submit(hook_client, keys.submit, "c0")
    second = submit(hook_client, keys.other_submit, "c0")  # the same subject: merged into the first
    assert second != first
    publish(sessions, claim(sessions))
    by_hook = {row.webhook_id: row.payload["data"] for row in deliveries(sessions)}
    assert by_hook[first_hook["id"]]["request_id"] == first
    assert by_hook[second_hook["id"]] == {
        **by_hook[first_hook["id"]],
        "request_id": second,
        "merged_into": first,
    }


def test_a_certification_result_is_queued_for_the_versions_submitters(
    hook_client: TestClient, keys: Keys, ready_model: str, sessions: sessionmaker[Session]
) -> None:
    hook = register(hook_client, keys.submit, "https://example.com/c", events=["certification.finished"])
    request_id = submit(hook_client, keys.submit)
    published = publish(sessions, claim(sessions))
    assert deliveries(sessions) == []  # not subscribed to completions
    with transaction(sessions) as session:
        row, _ = certification.request_certification(session, "digits", published.version, actor="test")
        certification.finish(
            session,
            row,
            status="flagged",
            version=published.version,
            at=utcnow(),
            result={"verdict": "out_of_bounds"},
            verdicts={request_id: "out_of_bounds"},
        )
        certification_id = row.id
    [delivery] = deliveries(sessions)
    assert (delivery.webhook_id, delivery.event) == (hook["id"], "certification.finished")
    assert delivery.payload["data"] == {
        "request_id": request_id,
        "status": "completed",
        "model": "digits",
        "certification_id": certification_id,
        "certification_status": "flagged",
        "version": published.version,
        "verdict": "out_of_bounds",
    }


def test_deliveries_give_up_after_max_attempts_and_never_reach_private_addresses_unless_allowed(
    hook_client: TestClient,
    keys: Keys,
    ready_model: str,
    sessions: sessionmaker[Session],
    receiver: Receiver,
    hook_settings: Settings,
) -> None:
    register(hook_client, keys.submit, receiver.url)
    submit(hook_client, keys.submit)
    publish(sessions, claim(sessions))
    strict = Sender(
        sessions,
        hook_settings.model_copy(
            update={"webhook_allow_private_addresses": False, "webhook_max_attempts": 2}
        ),
    )
    try:
        [refused] = strict.run_once()
        assert refused.status_code is None
        assert refused.error is not None
        assert "127.0.0.1" in refused.error
        assert "not a public address" in refused.error
        assert receiver.received == []  # checked at send time, after DNS
        [again] = strict.run_once()
        assert again.error == refused.error
        assert strict.run_once() == []
    finally:
        strict.close()
    [row] = deliveries(sessions)
    assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 2, None)


def test_address_classification() -> None:
    assert is_public("93.184.216.34")
    assert is_public("2606:2800:220:1::1")
    private = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "::1"]
    private += ["fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1", "100.64.0.1", "224.0.0.1", "0.0.0.0"]
    for address in private:
        assert not is_public(address), address


def test_the_worker_thread_sends_due_deliveries(
    hook_client: TestClient,
    keys: Keys,
    ready_model: str,
    sessions: sessionmaker[Session],
    receiver: Receiver,
    sender: Sender,
) -> None:
    """What a worker runs beside its rounds (``worker/tasks.py`` starts it)."""
    hook = register(hook_client, keys.submit, receiver.url)
    submit(hook_client, keys.submit)
    publish(sessions, claim(sessions))
    thread = SenderThread(sender, interval=0.05)
    thread.start()
    try:
        assert receiver.got.wait(10), "the thread sent nothing"
    finally:
        thread.stop()
    headers, body = receiver.received[0]
    assert verify(hook["secret"], headers, body)["type"] == "forget_request.completed"
