"""POST /v1/forget-requests/bulk (service/bulk.py): one result per item, stored exactly once.

Issue 10 part 5: there was no bulk submission; 10,000 requests took 10,000 calls. Every test here
fails on the old code (the route answered 404 / 405).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from service import bulk
from service.db.models import ForgetRequest
from service.db.session import transaction
from service.repositories import events as events_repo
from service.repositories import requests as requests_repo
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body, task_body

pytestmark = pytest.mark.usefixtures("ready_model")
URL = "/v1/forget-requests/bulk"
#: 60 distinct subjects of the seeded model (12 samples): enough for the COPY path (service/db/copy.py)
PAIRS = [[f"s{a:05d}", f"s{b:05d}"] for a in range(12) for b in range(a + 1, 12)][:60]


def item(key: str, request: Any) -> dict[str, Any]:
    return {"idempotency_key": key, "request": request}


def rows(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        return int(session.scalar(select(func.count()).select_from(ForgetRequest)) or 0)


def test_each_item_gets_its_own_result(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    items = [
        item("a", client_body("c0")),  # 0: created
        item("b", client_body("c1", external_id="DSR-1")),  # 1: created
        item("c", client_body("c0")),  # 2: merged into item 0 (same subject, own key): 200
        item("d", client_body("c9")),  # 3: unknown client: 404
        item("e", client_body("c2", model="nope")),  # 4: unknown model: 404
        item("f", {"model": "digits", "kind": "client"}),  # 5: malformed: 422
        item("", client_body("c2")),  # 6: bad idempotency key: 422
        item("a", client_body("c0")),  # 7: item 0 again (same key, same body): 200, its request
        item("a", client_body("c2")),  # 8: item 0's key with another body: 422
        item("g", client_body("c2", tasks=["colour"])),  # 9: unknown task: 422
        item("h", task_body(["s00008"], ["parity"])),  # 10: created
        "not an object",  # 11: 422
    ]
    response = client.post(URL, json={"items": items}, headers=keys.submit)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["items"]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert [r["status"] for r in results] == [201, 201, 200, 404, 404, 422, 422, 200, 422, 422, 201, 422]
    assert (body["created"], body["unchanged"], body["failed"]) == (3, 2, 7)
    fields = [r["problem"].get("field") if r["problem"] else None for r in results]
    assert fields[3:7] == ["client_id", "model", "request.client_id", "idempotency_key"]
    assert fields[8:10] == ["Idempotency-Key", "tasks"]
    for r in results:
        assert (r["request"] is None) == (r["status"] >= 400)
        if r["problem"]:
            assert r["problem"]["status"] == r["status"]
            assert r["problem"]["instance"] == URL
    first = results[0]["request"]
    assert first["status"] == "queued"
    assert results[7]["request"]["id"] == first["id"]
    assert results[2]["request"]["id"] != first["id"]  # a request of its own, showing item 0's status
    assert results[1]["request"]["external_id"] == "DSR-1"
    assert rows(sessions) == 4  # items 0, 1, 2 (merged) and 10
    # each is readable by its id and the event chain holds
    for r in (results[0], results[2], results[10]):
        got = client.get(f"/v1/forget-requests/{r['request']['id']}", headers=keys.submit)
        assert got.status_code == 200
    events = client.get(f"/v1/forget-requests/{results[2]['request']['id']}/events", headers=keys.submit)
    assert [e["type"] for e in events.json()][:2] == ["received", "merged"]
    with transaction(sessions) as session:
        assert events_repo.verify_chain(session).ok


def test_a_replayed_bulk_call_stores_nothing_twice(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    items = [item(f"k{i}", task_body(pair, ["digit"])) for i, pair in enumerate(PAIRS)]
    first = client.post(URL, json={"items": items}, headers=keys.submit).json()
    assert first["created"] == 60
    again = client.post(URL, json={"items": items}, headers=keys.submit).json()
    assert (again["created"], again["unchanged"], again["failed"]) == (0, 60, 0)
    assert [r["request"]["id"] for r in again["items"]] == [r["request"]["id"] for r in first["items"]]
    single = client.post(
        "/v1/forget-requests", json=items[3]["request"], headers={**keys.submit, "Idempotency-Key": "k3"}
    )
    assert single.status_code == 200
    assert single.json()["id"] == first["items"][3]["request"]["id"]
    other_key = client.post(URL, json={"items": items[:2]}, headers=keys.other_submit).json()
    assert other_key["unchanged"] == 2  # merged: another key's requests for the same subjects
    assert rows(sessions) == 62
    with transaction(sessions) as session:
        assert events_repo.verify_chain(session).ok


def test_too_many_or_no_items_is_a_problem(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    # small items: the test app's body limit is 64 KiB (a body over the limit is a 413 anyway)
    too_many = [0] * (bulk.MAX_ITEMS + 1)
    assert_problem(client.post(URL, json={"items": too_many}, headers=keys.submit), 422, field="items")
    assert_problem(client.post(URL, json={"items": []}, headers=keys.submit), 422, field="items")
    assert_problem(client.post(URL, json={"items": [0], "more": 1}, headers=keys.submit), 422, field="more")
    one = [item("k", client_body("c0"))]
    assert_problem(client.post(URL, json={"items": one}), 401)
    assert_problem(client.post(URL, json={"items": one}, headers=keys.serve), 403)
    assert rows(sessions) == 0


def test_models_are_woken_once_after_the_commit(
    client: TestClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    woken: list[str] = []
    monkeypatch.setattr(client.app.state.lethe.dispatcher, "wake_soon", woken.append)  # type: ignore[attr-defined]
    items = [item(f"k{i}", client_body(f"c{i}")) for i in range(3)]
    assert client.post(URL, json={"items": items}, headers=keys.submit).json()["created"] == 3
    assert woken == ["digits"]
    client.post(URL, json={"items": items}, headers=keys.submit)  # replays: nothing new to run
    assert woken == ["digits"]


def _statements(engine: Any) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_a_batch_takes_a_fixed_number_of_queries(client: TestClient, keys: Keys) -> None:
    engine = client.app.state.lethe.engine  # type: ignore[attr-defined]
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs in-process: there are no round trips to save")
    items = [item(f"k{i}", task_body(pair, ["digit", "parity"])) for i, pair in enumerate(PAIRS)]
    recorder = _statements(engine)
    seen = next(recorder)
    response = client.post(URL, json={"items": items}, headers=keys.submit)
    next(recorder, None)
    assert response.json()["created"] == 60, response.text
    # no per-item queries: the same count for 60 items as for 1000 (the inserts are one COPY each)
    counted = [s for s in seen if not s.lstrip().upper().startswith(("SAVEPOINT", "RELEASE"))]
    assert len(counted) < 20, "\n".join(s[:150].replace("\n", " ") for s in counted)


def test_a_concurrent_insert_falls_back_to_one_by_one(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission that lands between the batch's look-up and its insert (here: the look-up
    misses it) makes the batched INSERT fail; every item is then submitted on its own."""
    first = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "a"}
    ).json()
    monkeypatch.setattr(requests_repo, "by_idempotency_keys", lambda *args: {})
    # 61 items: over the COPY threshold, so PostgreSQL's COPY meets the unique violation
    others = [item(f"p{i}", task_body(pair, ["digit"])) for i, pair in enumerate(PAIRS[:59])]
    items = [item("a", client_body("c0")), *others, item("c", client_body("c9"))]
    body = client.post(URL, json={"items": items}, headers=keys.submit).json()
    assert [r["status"] for r in body["items"]] == [200] + [201] * 59 + [404]
    assert body["items"][0]["request"]["id"] == first["id"]
    assert rows(sessions) == 60
    with transaction(sessions) as session:
        assert events_repo.verify_chain(session).ok
