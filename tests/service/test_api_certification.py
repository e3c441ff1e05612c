"""POST /v1/admin/models/{model}/versions/{version}/certify (issue 8 part 5): 202, dispatched after
the commit by task name with the id only, one live certification per version, and the version's
certification (and flag) in the admin model listing."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import rounds
from service.db.models import Certification
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import certifications as certifications_repo
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from tests.service.conftest import DIGEST, Keys
from tests.service.helpers import assert_problem, client_body

URL = "/v1/admin/models/digits/versions/{v}/certify"


def _publish_v2(client: TestClient, keys: Keys, sessions: sessionmaker[Session]) -> str:
    response = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "c0"}
    )
    assert response.status_code == 201, response.text
    with transaction(sessions) as session:
        claimed = rounds.claim_round(
            session, "digits", "w1", lease_seconds=60, max_requests=1, max_attempts=3
        )
        assert claimed is not None
        rounds.publish_round(
            session,
            claimed,
            location="digits/adapters/1-1",
            files={"adapter_model.safetensors": DIGEST},
            evidence={},
            withdraw_versions=[],
        )
    request_id = response.json()["id"]
    assert isinstance(request_id, str)
    return request_id


@pytest.mark.usefixtures("ready_model")
def test_certify_is_accepted_dispatched_after_commit_and_listed(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish_v2(client, keys, sessions)
    sent: list[tuple[int, str | None]] = []

    def certify(certification_id: int) -> bool:
        with transaction(sessions) as session:  # another session: the row must be committed already
            row = certifications_repo.get(session, certification_id)
            sent.append((certification_id, None if row is None else row.status))
        return True

    monkeypatch.setattr(client.app.state.lethe.dispatcher, "certify", certify)  # type: ignore[attr-defined]
    response = client.post(URL.format(v=2), headers=keys.admin)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["model"], body["version"], body["status"], body["trigger"]) == (
        "digits",
        2,
        "requested",
        "on_demand",
    )
    assert body["verdict"] is None
    assert sent == [(body["id"], "requested")]
    # a second request while it is live returns the same certification (and wakes a worker again)
    again = client.post(URL.format(v=2), headers=keys.admin)
    assert again.status_code == 202
    assert again.json()["id"] == body["id"]
    versions = {
        v["version"]: v for v in client.get("/v1/admin/models/digits", headers=keys.admin).json()["versions"]
    }
    assert versions[1]["certification"] is None
    assert versions[2]["certification"]["id"] == body["id"]
    assert versions[2]["flagged"] is False
    # the worker finds it out of bounds: the version is flagged for admins in the listing
    with transaction(sessions) as session:
        row = session.get(Certification, body["id"])
        assert row is not None
        certifications_repo.finish(
            session,
            row,
            status="flagged",
            at=utcnow(),
            result={"verdict": "out_of_bounds", "within_bounds": False},
        )
    versions = {
        v["version"]: v for v in client.get("/v1/admin/models/digits", headers=keys.admin).json()["versions"]
    }
    assert versions[2]["flagged"] is True
    assert versions[2]["certification"]["verdict"] == "out_of_bounds"
    assert versions[2]["certification"]["within_bounds"] is False
    # a finished certification is not live: asking again starts a new one
    third = client.post(URL.format(v=2), headers=keys.admin)
    assert third.status_code == 202
    assert third.json()["id"] != body["id"]


@pytest.mark.usefixtures("ready_model")
def test_certify_rejects_what_cannot_be_certified(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    assert_problem(client.post("/v1/admin/models/nope/versions/2/certify", headers=keys.admin), 404)
    for bad in ("9", "0", "-1", "abc", "99999999999999999999", "02"):
        assert_problem(client.post(URL.format(v=bad), headers=keys.admin), 404)
    assert_problem(client.post(URL.format(v=1), headers=keys.admin), 409)  # v1 served no request
    assert_problem(client.post(URL.format(v=2), headers=keys.submit), 403)
    _publish_v2(client, keys, sessions)
    with transaction(sessions) as session:
        found = models_repo.get_model(session, "digits")
        assert found is not None
        versions_repo.withdraw(session, found.id, [2], at=utcnow())  # its files are deleted
    assert_problem(client.post(URL.format(v=2), headers=keys.admin), 409)
    with transaction(sessions) as session:
        assert session.scalars(select(Certification)).first() is None  # nothing was created
