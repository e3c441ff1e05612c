"""``/v1/admin/models/{name}/clients`` and ``.../clients/{client_id}/samples``: what the demo (and an
operator) reads over HTTP instead of the ORM (issue 10 part 8: the demo talks to the admin API)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Sample, Subject
from service.db.session import transaction
from tests.service.conftest import Keys, seed_ready_model
from tests.service.helpers import assert_problem, client_body

CLIENTS = "/v1/admin/models/digits/clients"


def _pages(client: TestClient, url: str, keys: Keys, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of a paginated list, following ``next_cursor``."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = client.get(url, params=query, headers=keys.admin)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not end"


def test_clients_say_which_are_active_and_which_a_request_names(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    seed_ready_model(sessions, clients=5)
    response = client.post(
        "/v1/forget-requests", json=client_body("c1"), headers={**keys.submit, "Idempotency-Key": "c1"}
    )
    assert response.status_code == 201, response.text
    with transaction(sessions) as session:
        session.execute(update(Subject).where(Subject.client_id == "c3").values(status="forgotten"))

    pages = _pages(client, CLIENTS, keys, limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    items = [item for page in pages for item in page]
    assert [(i["client_id"], i["status"], i["requested"]) for i in items] == [
        ("c0", "active", False),
        ("c1", "active", True),
        ("c2", "active", False),
        ("c3", "forgotten", False),
        ("c4", "active", False),
    ]
    assert items[0]["samples"] == 4
    active = [i["client_id"] for page in _pages(client, CLIENTS, keys, status="active") for i in page]
    assert active == ["c0", "c1", "c2", "c4"]


@pytest.mark.usefixtures("ready_model")
def test_kept_samples_of_a_client_for_a_task(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    # c1 has s00004..s00007: one purged whole, one whose `parity` label was purged
    with transaction(sessions) as session:
        session.execute(update(Sample).where(Sample.sample_id == "s00004").values(purged=True))
        session.execute(update(Sample).where(Sample.sample_id == "s00006").values(purged_tasks=["parity"]))
    url = f"{CLIENTS}/c1/samples"
    kept = [i["sample_id"] for page in _pages(client, url, keys, limit=1) for i in page]
    assert kept == ["s00005", "s00006", "s00007"]
    for_parity = _pages(client, url, keys, task="parity", limit=1)
    assert [i["sample_id"] for page in for_parity for i in page] == ["s00005", "s00007"]
    assert all(len(page) == 1 for page in for_parity)
    one = client.get(url, params={"task": "digit"}, headers=keys.admin).json()
    assert one["next_cursor"] is None
    assert one["items"][1] == {"sample_id": "s00006", "purged_tasks": ["parity"], "forgotten_tasks": []}


@pytest.mark.usefixtures("ready_model")
def test_clients_and_samples_answer_problems(client: TestClient, keys: Keys) -> None:
    """Every bad input is a 4xx problem, never a 500 (a NUL byte in a path or cursor included)."""
    samples = f"{CLIENTS}/c1/samples"
    nul_cursor = base64.urlsafe_b64encode(b"sample:\x00").decode()
    huge_cursor = base64.urlsafe_b64encode(b"subject:" + b"9" * 30).decode()
    cases: list[tuple[str, dict[str, Any], dict[str, str], int, str | None]] = [
        ("/v1/admin/models/nope/clients", {}, keys.admin, 404, None),
        ("/v1/admin/models/nope/clients/c1/samples", {}, keys.admin, 404, None),
        (f"{CLIENTS}/c9/samples", {}, keys.admin, 404, None),
        (f"{CLIENTS}/c%00/samples", {}, keys.admin, 404, None),
        (samples, {"task": "colour"}, keys.admin, 422, "task"),
        (samples, {"task": "bad task"}, keys.admin, 422, None),
        (samples, {"cursor": "!!"}, keys.admin, 400, "cursor"),
        (samples, {"cursor": nul_cursor}, keys.admin, 400, "cursor"),
        (samples, {"cursor": base64.urlsafe_b64encode(b"subject:3").decode()}, keys.admin, 400, "cursor"),
        (CLIENTS, {"cursor": base64.urlsafe_b64encode(b"subject:x").decode()}, keys.admin, 400, "cursor"),
        (CLIENTS, {"cursor": huge_cursor}, keys.admin, 400, None),
        (CLIENTS, {"status": "gone"}, keys.admin, 422, None),
        (CLIENTS, {"limit": 0}, keys.admin, 422, None),
        (CLIENTS, {}, keys.submit, 403, None),
        (CLIENTS, {}, {}, 401, None),
        (samples, {}, keys.serve, 403, None),
    ]
    for url, params, headers, status, field in cases:
        assert_problem(client.get(url, params=params, headers=headers), status, field=field)


@pytest.mark.usefixtures("ready_model")
def test_a_cursor_pages_only_the_list_that_gave_it(client: TestClient, keys: Keys) -> None:
    """Defect: the ``next_cursor`` of c1's samples paged c2's samples (200) and c1's samples with
    ``?task=`` added; a forged ``base64("sample:zzz")`` was an empty page: now each is a 400."""
    c1, c2 = f"{CLIENTS}/c1/samples", f"{CLIENTS}/c2/samples"
    first = client.get(c1, params={"limit": 1}, headers=keys.admin).json()
    cursor = first["next_cursor"]
    assert first["items"][0]["sample_id"] == "s00004"
    assert cursor
    second = client.get(c1, params={"limit": 1, "cursor": cursor}, headers=keys.admin)
    assert second.status_code == 200, second.text
    assert [i["sample_id"] for i in second.json()["items"]] == ["s00005"]  # valid cursors still page
    forged = base64.urlsafe_b64encode(b"sample:zzz").decode()
    for url, params in (
        (c2, {"cursor": cursor}),
        (c1, {"cursor": cursor, "task": "digit"}),
        (c1, {"cursor": forged}),
        (CLIENTS, {"cursor": cursor}),
    ):
        problem = assert_problem(client.get(url, params=params, headers=keys.admin), 400, field="cursor")
        assert "cursor" in problem["detail"]
    active = client.get(CLIENTS, params={"limit": 1, "status": "active"}, headers=keys.admin).json()
    assert active["next_cursor"]
    assert_problem(client.get(CLIENTS, params={"cursor": active["next_cursor"]}, headers=keys.admin), 400)
    again = client.get(
        CLIENTS, params={"cursor": active["next_cursor"], "status": "active"}, headers=keys.admin
    )
    assert [i["client_id"] for i in again.json()["items"]] == ["c1", "c2"]
