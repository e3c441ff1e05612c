"""Deadlines in calendar months (GDPR Art. 12(3)), extensions with a reason, the queue by deadline.

Covers issue 9, item 9: ``due_at`` was receipt + 30 days (Jan 31 → Mar 2), there was no extension
and no way to find overdue requests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service import deadlines, lifecycle, rounds
from service.db.models import ForgetRequest
from service.db.session import transaction
from service.db.types import utcnow
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2027, 1, 31, 10, 30, tzinfo=UTC), 1, datetime(2027, 2, 28, 10, 30, tzinfo=UTC)),
        (datetime(2028, 1, 31, 10, 30, tzinfo=UTC), 1, datetime(2028, 2, 29, 10, 30, tzinfo=UTC)),
        (datetime(2027, 3, 31, tzinfo=UTC), 1, datetime(2027, 4, 30, tzinfo=UTC)),
        (datetime(2027, 12, 15, tzinfo=UTC), 1, datetime(2028, 1, 15, tzinfo=UTC)),
        (datetime(2027, 11, 30, tzinfo=UTC), 3, datetime(2028, 2, 29, tzinfo=UTC)),
        (datetime(2027, 1, 31, tzinfo=UTC), 3, datetime(2027, 4, 30, tzinfo=UTC)),
    ],
)
def test_calendar_months_clamp_to_the_last_day(start: datetime, months: int, expected: datetime) -> None:
    assert deadlines.add_months(start, months) == expected


def submit(client: TestClient, keys: Keys, client_id: str) -> dict[str, object]:
    response = client.post(
        "/v1/forget-requests",
        json=client_body(client_id),
        headers={**keys.submit, "Idempotency-Key": client_id},
    )
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


@pytest.mark.usefixtures("ready_model")
def test_a_request_received_on_january_31_is_due_on_february_28(
    client: TestClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receipt + 30 days made it March 2; one calendar month is February 28."""
    received = datetime(2027, 1, 31, 9, 0, tzinfo=UTC)
    monkeypatch.setattr(lifecycle, "utcnow", lambda: received)
    created = submit(client, keys, "c0")
    assert datetime.fromisoformat(str(created["received_at"])) == received
    assert datetime.fromisoformat(str(created["due_at"])) == datetime(2027, 2, 28, 9, 0, tzinfo=UTC)
    assert created["extended_months"] == 0


@pytest.mark.usefixtures("ready_model")
def test_extension_records_its_reason_and_stops_at_two_months(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    created = submit(client, keys, "c0")
    request_id, received = str(created["id"]), datetime.fromisoformat(str(created["received_at"]))
    url = f"/v1/admin/forget-requests/{request_id}/extend"
    first = client.post(url, json={"months": 1, "reason": "complex: 40 linked datasets"}, headers=keys.admin)
    assert first.status_code == 200, first.text
    assert first.json()["extended_months"] == 1
    assert datetime.fromisoformat(first.json()["due_at"]) == deadlines.add_months(received, 2)

    too_far = client.post(url, json={"months": 2, "reason": "more"}, headers=keys.admin)
    assert_problem(too_far, 409, field="months")
    second = client.post(url, json={"months": 1, "reason": "number of requests"}, headers=keys.admin)
    assert second.status_code == 200, second.text
    assert datetime.fromisoformat(second.json()["due_at"]) == deadlines.add_months(received, 3)
    assert_problem(client.post(url, json={"months": 1, "reason": "again"}, headers=keys.admin), 409)

    events = client.get(f"/v1/forget-requests/{request_id}/events", headers=keys.admin).json()
    extensions = [e["detail"] for e in events if e["type"] == "deadline_extended"]
    assert [(d["months"], d["reason"], d["extended_months"]) for d in extensions] == [
        (1, "complex: 40 linked datasets", 1),
        (1, "number of requests", 2),
    ]
    assert client.get("/v1/admin/audit/verify", headers=keys.admin).json()["ok"] is True


@pytest.mark.usefixtures("ready_model")
def test_extension_bad_input_and_closed_requests(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    request_id = str(submit(client, keys, "c0")["id"])
    url = f"/v1/admin/forget-requests/{request_id}/extend"
    admin = keys.admin
    assert_problem(client.post(url, json={"months": 3, "reason": "x"}, headers=admin), 422, field="months")
    assert_problem(client.post(url, json={"months": 0, "reason": "x"}, headers=admin), 422, field="months")
    assert_problem(client.post(url, json={"months": 1}, headers=admin), 422, field="reason")
    assert_problem(client.post(url, json={"months": 1, "reason": ""}, headers=admin), 422, field="reason")
    assert_problem(client.post(url, json={"months": 1, "reason": "a\nb"}, headers=admin), 422)
    # defect: `true` and "1" were one month (200, the deadline moved); a number of months is an integer
    for months in (True, "1", 1.0, "2", [1]):
        body = {"months": months, "reason": "x"}
        assert_problem(client.post(url, json=body, headers=admin), 422, field="months")
    shown = client.get(f"/v1/forget-requests/{request_id}", headers=admin).json()
    assert shown["extended_months"] == 0
    assert_problem(client.post(url, json={"months": 1, "reason": "x"}, headers=keys.submit), 403)
    missing = "/v1/admin/forget-requests/00000000-0000-4000-8000-000000000000/extend"
    assert_problem(client.post(missing, json={"months": 1, "reason": "x"}, headers=keys.admin), 404)
    upper = f"/v1/admin/forget-requests/{request_id.upper()}/extend"  # an id in any case names it
    extended = client.post(upper, json={"months": 1, "reason": "x"}, headers=admin)
    assert (extended.status_code, extended.json()["extended_months"]) == (200, 1), extended.text
    cancelled = client.post(f"/v1/admin/forget-requests/{request_id}/cancel", headers=keys.admin)
    assert cancelled.status_code == 200
    assert_problem(client.post(url, json={"months": 1, "reason": "x"}, headers=keys.admin), 409)


@pytest.mark.usefixtures("ready_model")
def test_queue_by_deadline_with_overdue_filter_and_cursor(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    ids = {c: str(submit(client, keys, c)["id"]) for c in ("c0", "c1", "c2")}
    now = utcnow()
    due = {"c0": now + timedelta(days=3), "c1": now - timedelta(days=2), "c2": now - timedelta(hours=1)}
    with transaction(sessions) as session:
        for c, at in due.items():
            session.execute(update(ForgetRequest).where(ForgetRequest.id == ids[c]).values(due_at=at))
    with transaction(sessions) as session:  # a failed request is still open: it counts
        claimed = rounds.claim_round(
            session, "digits", "w1", lease_seconds=60, max_requests=1, max_attempts=3
        )
        assert claimed is not None
        assert [r.id for r in claimed.requests] == [ids["c0"]]
        rounds.fail_round(session, claimed, error="boom", retryable=False)

    everything = client.get("/v1/admin/queue/requests", headers=keys.admin)
    assert everything.status_code == 200, everything.text
    assert [r["id"] for r in everything.json()["items"]] == [ids["c1"], ids["c2"], ids["c0"]]
    assert everything.json()["items"][2]["status"] == "failed"

    overdue = client.get("/v1/admin/queue/requests?overdue=true&limit=1", headers=keys.admin).json()
    assert [r["id"] for r in overdue["items"]] == [ids["c1"]]
    page2 = client.get(
        "/v1/admin/queue/requests", params={"overdue": "true", "limit": 1, "cursor": overdue["next_cursor"]},
        headers=keys.admin,
    ).json()  # fmt: skip
    assert [r["id"] for r in page2["items"]] == [ids["c2"]]
    assert page2["next_cursor"] is None
    # the cursor belongs to the overdue list: without the filter, or for one model, it is a 400
    others: list[dict[str, str]] = [{}, {"overdue": "true", "model": "digits"}]
    for other in others:
        params = {"cursor": str(overdue["next_cursor"]), **other}
        response = client.get("/v1/admin/queue/requests", params=params, headers=keys.admin)
        assert_problem(response, 400, field="cursor")

    entry = client.get("/v1/admin/queue", headers=keys.admin).json()[0]
    assert entry["overdue"] == 2
    assert datetime.fromisoformat(entry["next_due_at"]) == due["c1"]

    assert_problem(client.get("/v1/admin/queue/requests?cursor=zz", headers=keys.admin), 400, field="cursor")
    assert_problem(client.get("/v1/admin/queue/requests?model=nope", headers=keys.admin), 404, field="model")
    assert_problem(client.get("/v1/admin/queue/requests", headers=keys.submit), 403)
