"""A registered model stores its workload options (issue 7 part 5): the admin API accepts, checks
and shows ``workload_options``; a bad one is a 422 problem and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service import rounds, workload_options
from service.db.session import transaction
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem


def test_model_stores_and_shows_its_workload_options(
    client: TestClient, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    """Defect: a registered model could not carry workload options (data path, seed, sizes)."""
    options: dict[str, Any] = {"seed": 3, "num_clients": 4, "root": "/data/x", "sizes": [1, 2]}
    body = {"name": "fraud", "workload": "digits-clients", "workload_options": options}
    created = client.post("/v1/admin/models", json=body, headers=keys.admin)
    assert created.status_code == 201, created.text
    assert created.json()["workload_options"] == options
    assert client.get("/v1/admin/models/fraud", headers=keys.admin).json()["workload_options"] == options
    assert [m["workload_options"] for m in client.get("/v1/admin/models", headers=keys.admin).json()] == [
        options
    ]
    # a failed model registered again takes the new options
    with transaction(sessions) as session:
        rounds.mark_model_failed(session, "fraud", error="ValueError: workload refused the options")
    again = client.post(
        "/v1/admin/models", json={**body, "workload_options": {"seed": 4}}, headers=keys.admin
    )
    assert again.status_code == 201, again.text
    assert again.json()["workload_options"] == {"seed": 4}
    plain = client.post(
        "/v1/admin/models", json={"name": "plain", "workload": "digits-clients"}, headers=keys.admin
    )
    assert plain.json()["workload_options"] == {}


@pytest.mark.parametrize(
    "options",
    [
        b'{"1st": 1}',  # not a keyword argument name
        b'{"_private": 1}',
        b'{"a-b": 1}',
        b'{"n": NaN}',
        b'{"n": "\\ud800"}',
        b'["not", "an", "object"]',
        b'{"blob": "' + b"x" * (workload_options.MAX_OPTIONS_BYTES + 1) + b'"}',
    ],
)
def test_bad_workload_options_are_refused(client: TestClient, keys: Keys, options: bytes) -> None:
    """Options that cannot be keyword arguments, are not plain JSON or are too big: 422, nothing stored."""
    body = b'{"name": "fraud", "workload": "digits-clients", "workload_options": ' + options + b"}"
    response = client.post(
        "/v1/admin/models", content=body, headers={**keys.admin, "Content-Type": "application/json"}
    )
    assert_problem(response, 422, field="workload_options")
    assert client.get("/v1/admin/models", headers=keys.admin).json() == []


def test_option_pairs_are_parsed_as_json_else_as_strings() -> None:
    parsed = workload_options.parse_pairs(
        ["n=3", "ratio=0.5", "on=true", 'name="a b"', "path=/data/x=1", "sizes=[1, 2]", "n=4"]
    )
    assert parsed == {"n": 4, "ratio": 0.5, "on": True, "name": "a b", "path": "/data/x=1", "sizes": [1, 2]}
    for bad in ("novalue", "=3", "1x=2"):
        with pytest.raises(ValueError, match=r"KEY=VALUE|keyword"):
            workload_options.parse_pairs([bad])
