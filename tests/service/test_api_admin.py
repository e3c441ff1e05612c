"""/v1/admin: queue, workers, cancel / retry, model registry, audit chain verification."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.db.models import RequestEvent
from service.db.session import transaction
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body


def submit(client: TestClient, keys: Keys, client_id: str) -> str:
    response = client.post(
        "/v1/forget-requests",
        json=client_body(client_id),
        headers={**keys.submit, "Idempotency-Key": client_id},
    )
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]
    assert isinstance(request_id, str)
    return request_id


def claim(sessions: sessionmaker[Session], max_requests: int = 1) -> rounds.ClaimedRound:
    with transaction(sessions) as session:
        claimed = rounds.claim_round(
            session, "digits", "w1", lease_seconds=60, max_requests=max_requests, max_attempts=3
        )
    assert claimed is not None
    return claimed


@pytest.mark.usefixtures("ready_model")
def test_queue_and_workers(client: TestClient, keys: Keys, sessions: sessionmaker[Session]) -> None:
    ids = [submit(client, keys, c) for c in ("c0", "c1")]
    claimed = claim(sessions)
    with transaction(sessions) as session:
        rounds.heartbeat(session, "w1", hostname="gpu-1", queues=["lethe-gpu"], state="busy")
    queue = client.get("/v1/admin/queue", headers=keys.admin).json()
    assert len(queue) == 1
    entry = queue[0]
    assert (entry["model"], entry["pending"]) == ("digits", 1)
    assert entry["oldest_pending_age_seconds"] >= 0
    lease = entry["running_round"]
    assert (lease["round_id"], lease["owner"], lease["request_ids"]) == (claimed.round_id, "w1", ids[:1])
    assert lease["fencing_token"] == claimed.fencing_token
    workers = client.get("/v1/admin/workers", headers=keys.admin).json()
    assert [(w["id"], w["state"]) for w in workers] == [("w1", "busy")]
    assert_problem(client.get("/v1/admin/queue", headers=keys.submit), 403)
    assert_problem(client.get("/v1/admin/workers"), 401)


@pytest.mark.usefixtures("ready_model")
def test_cancel_only_before_running(client: TestClient, keys: Keys, sessions: sessionmaker[Session]) -> None:
    running, queued = submit(client, keys, "c0"), submit(client, keys, "c1")
    claim(sessions)
    url = "/v1/admin/forget-requests/{}/cancel"
    assert_problem(client.post(url.format(running), headers=keys.admin), 409)
    response = client.post(url.format(queued), headers=keys.admin)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert_problem(client.post(url.format(queued), headers=keys.admin), 409)
    assert_problem(client.post(url.format("missing"), headers=keys.admin), 404)
    assert_problem(client.post(url.format(queued), headers=keys.submit), 403)


@pytest.mark.usefixtures("ready_model")
def test_retry_only_failed(client: TestClient, keys: Keys, sessions: sessionmaker[Session]) -> None:
    request_id = submit(client, keys, "c0")
    url = f"/v1/admin/forget-requests/{request_id}/retry"
    assert_problem(client.post(url, headers=keys.admin), 409)
    claimed = claim(sessions)
    with transaction(sessions) as session:
        rounds.fail_round(session, claimed, error="diverged", retryable=False)
    assert client.get(f"/v1/forget-requests/{request_id}", headers=keys.submit).json()["error"] == "diverged"
    response = client.post(url, headers=keys.admin)
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["attempts"], response.json()["error"]) == (
        "queued",
        0,
        None,
    )
    assert_problem(client.post("/v1/admin/forget-requests/nope/retry", headers=keys.admin), 404)


@pytest.mark.usefixtures("ready_model")
def test_retry_refused_while_another_request_for_the_subject_is_pending(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    first = submit(client, keys, "c0")
    with transaction(sessions) as session:
        rounds.fail_round(session, claim(sessions), error="x", retryable=False)
    second = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "again"}
    ).json()
    assert second["id"] != first
    problem = assert_problem(client.post(f"/v1/admin/forget-requests/{first}/retry", headers=keys.admin), 409)
    assert problem["pending_request"] == second["id"]


def test_model_registry(client: TestClient, keys: Keys, sessions: sessionmaker[Session]) -> None:
    body = {"name": "fraud", "workload": "digits-clients", "method": "ssd", "method_config": {"alpha": 2}}
    created = client.post("/v1/admin/models", json=body, headers=keys.admin)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/admin/models/fraud"
    assert (created.json()["status"], created.json()["latest_version"]) == ("preparing", None)
    assert_problem(client.post("/v1/admin/models", json=body, headers=keys.admin), 409, field="name")
    unknown = {"name": "x", "workload": "no-such-workload"}
    assert_problem(client.post("/v1/admin/models", json=unknown, headers=keys.admin), 422, field="workload")
    bad_name = {"name": "Fraud Model", "workload": "digits-clients"}
    assert_problem(client.post("/v1/admin/models", json=bad_name, headers=keys.admin), 422, field="name")
    assert_problem(client.post("/v1/admin/models", json=body, headers=keys.submit), 403)

    # A failed preparation can be registered again.
    with transaction(sessions) as session:
        rounds.mark_model_failed(session, "fraud", error="out of memory")
    assert client.get("/v1/admin/models/fraud", headers=keys.admin).json()["error"] == "out of memory"
    again = client.post("/v1/admin/models", json=body, headers=keys.admin)
    assert again.status_code == 201
    assert (again.json()["status"], again.json()["error"]) == ("preparing", None)

    listed = client.get("/v1/admin/models", headers=keys.admin).json()
    assert [m["name"] for m in listed] == ["fraud"]
    assert_problem(client.get("/v1/admin/models/nope", headers=keys.admin), 404)


@pytest.mark.usefixtures("ready_model")
def test_model_detail(client: TestClient, keys: Keys) -> None:
    shown = client.get("/v1/admin/models/digits", headers=keys.admin).json()
    assert (shown["status"], shown["subjects"], shown["forgotten_subjects"]) == ("ready", 3, 0)
    assert shown["tasks"] == ["digit", "parity"]
    assert [v["version"] for v in shown["versions"]] == [1]
    assert shown["latest_version"] == 1


@pytest.mark.usefixtures("ready_model")
@pytest.mark.parametrize("field", ["method", "method_config", "settings"])
def test_reconfiguring_to_null_is_422_and_a_field_left_out_is_unchanged(
    client: TestClient, keys: Keys, field: str
) -> None:
    """Defect: ``{"settings": null}`` was a 200 that changed nothing; null is no value for a field."""
    url = "/v1/admin/models/digits"
    before = client.get(url, headers=keys.admin).json()
    problem = assert_problem(client.patch(url, json={field: None}, headers=keys.admin), 422, field=field)
    assert "null" in problem["detail"], problem
    unchanged = client.patch(url, json={}, headers=keys.admin)
    assert unchanged.status_code == 200, unchanged.text
    assert {k: unchanged.json()[k] for k in ("method", "method_config", "settings")} == {
        k: before[k] for k in ("method", "method_config", "settings")
    }
    assert client.get(f"{url}/events", headers=keys.admin).json() == []


@pytest.mark.usefixtures("ready_model")
def test_audit_verify_finds_a_tampered_event(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    for c in ("c0", "c1", "c2"):
        submit(client, keys, c)
    report = client.get("/v1/admin/audit/verify", headers=keys.admin).json()
    assert report == {
        "ok": True,
        "checked_events": 6,
        "head_hash": report["head_hash"],
        "first_broken": None,
        "pending_events": 0,
    }
    with transaction(sessions) as session:
        events = list(session.scalars(select(RequestEvent).order_by(RequestEvent.id)))
        victim = events[3]
        session.execute(
            update(RequestEvent).where(RequestEvent.id == victim.id).values(detail={"kind": "task"})
        )
    report = client.get("/v1/admin/audit/verify", headers=keys.admin).json()
    assert report["ok"] is False
    assert report["checked_events"] == 3
    assert report["first_broken"]["event_id"] == victim.id
    assert report["first_broken"]["request_id"] == victim.request_id
    assert "content" in report["first_broken"]["reason"]


@pytest.mark.usefixtures("ready_model")
def test_audit_verify_finds_a_deleted_or_backdated_event(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    for c in ("c0", "c1"):
        submit(client, keys, c)
    # submissions' events are chained after the commit (pending events are not tamper-evident yet)
    assert client.get("/v1/admin/audit/verify", headers=keys.admin).json()["checked_events"] == 4
    with transaction(sessions) as session:
        events = list(session.scalars(select(RequestEvent).order_by(RequestEvent.id)))
        session.execute(
            update(RequestEvent)
            .where(RequestEvent.id == events[1].id)
            .values(at=events[1].at - timedelta(days=1))
        )
    report = client.get("/v1/admin/audit/verify", headers=keys.admin).json()
    assert report["first_broken"]["event_id"] == events[1].id
    with transaction(sessions) as session:
        session.delete(session.get(RequestEvent, events[1].id))
    report = client.get("/v1/admin/audit/verify", headers=keys.admin).json()
    assert report["first_broken"]["event_id"] == events[2].id
    assert "prev_hash" in report["first_broken"]["reason"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (b'"method_config": {"alpha": NaN}', "method_config"),
        (b'"method_config": {"alpha": Infinity}', "method_config"),
        (b'"method_config": {"alpha": 1e999}', "method_config"),
        (b'"settings": {"note": "\\ud800"}', "settings"),
        (b'"settings": {"\\udfff": 1}', "settings"),
        (b'"settings": ' + b'{"a": ' * 21 + b"1" + b"}" * 21, "settings"),
        (b'"workload": "digits clients\\u0000"', "workload"),
    ],
)
def test_model_settings_must_be_plain_json(client: TestClient, keys: Keys, fields: bytes, field: str) -> None:
    """What a lenient JSON parser accepts but JSON cannot carry is refused, and nothing is stored."""
    body = b'{"name": "fraud", "workload": "digits-clients", ' + fields + b"}"
    response = client.post(
        "/v1/admin/models", content=body, headers={**keys.admin, "Content-Type": "application/json"}
    )
    assert_problem(response, 422, field=field)
    assert client.get("/v1/admin/models", headers=keys.admin).json() == []


def test_model_settings_may_nest_a_little(client: TestClient, keys: Keys) -> None:
    nested = {"default": {"ssd": {"alpha": 3.0, "fisher": "per_sample"}}, "anchor_fractions": {"ia": 0.5}}
    body = {"name": "fraud", "workload": "digits-clients", "settings": nested}
    assert client.post("/v1/admin/models", json=body, headers=keys.admin).status_code == 201
    assert client.get("/v1/admin/models/fraud", headers=keys.admin).json()["settings"] == nested
