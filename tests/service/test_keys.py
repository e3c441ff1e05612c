"""API keys: list, create, revoke and rotate (admin API and CLI), last-used time, and 429 with
``Retry-After`` after repeated bad keys from one address.

Covers issue 9, item 11: only ``keys create`` existed, and 200 bad keys in a row all got 401.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service import cli
from service.api.state import AppState
from service.api.throttle import AuthFailures
from service.repositories import keys as keys_repo
from tests.service.conftest import Keys
from tests.service.helpers import assert_problem, client_body


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_list_create_and_last_used(client: TestClient, keys: Keys) -> None:
    created = client.post("/v1/admin/keys", json={"scopes": ["serve"], "name": "edge-1"}, headers=keys.admin)
    assert created.status_code == 201, created.text
    new = created.json()
    assert new["key"].startswith("lethe_")
    assert (new["scopes"], new["name"], new["last_used_at"]) == (["serve"], "edge-1", None)

    assert client.get("/v1/models/digits/adapters/latest", headers=bearer(new["key"])).status_code == 404
    listed = client.get("/v1/admin/keys", headers=keys.admin)
    assert listed.status_code == 200
    rows = {k["id"]: k for k in listed.json()}
    assert rows[new["id"]]["last_used_at"] is not None
    assert all("key" not in k and "key_hash" not in k for k in rows.values())
    assert new["key"] not in listed.text

    assert_problem(
        client.post("/v1/admin/keys", json={"scopes": []}, headers=keys.admin), 422, field="scopes"
    )
    assert_problem(client.post("/v1/admin/keys", json={"scopes": ["root"]}, headers=keys.admin), 422)
    assert_problem(client.get("/v1/admin/keys", headers=keys.submit), 403)


@pytest.mark.usefixtures("ready_model")
def test_revoke_and_rotate(client: TestClient, keys: Keys) -> None:
    secret = keys.submit["Authorization"].removeprefix("Bearer ")
    ids = {k["prefix"]: k["id"] for k in client.get("/v1/admin/keys", headers=keys.admin).json()}
    key_id = ids[secret[:12]]
    submitted = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**keys.submit, "Idempotency-Key": "r1"}
    )
    assert submitted.status_code == 201, submitted.text

    rotated = client.post(f"/v1/admin/keys/{key_id}/rotate", headers=keys.admin)
    assert rotated.status_code == 200, rotated.text
    fresh = rotated.json()["key"]
    assert fresh != secret
    assert rotated.json()["id"] == key_id
    assert rotated.json()["rotated_at"] is not None
    assert_problem(client.get("/v1/forget-requests", headers=keys.submit), 401)
    # same key row: it still sees what it submitted, and its idempotency keys still replay
    mine = client.get("/v1/forget-requests", headers=bearer(fresh)).json()["items"]
    assert [r["id"] for r in mine] == [submitted.json()["id"]]
    replay = client.post(
        "/v1/forget-requests", json=client_body("c0"), headers={**bearer(fresh), "Idempotency-Key": "r1"}
    )
    assert (replay.status_code, replay.json()["id"]) == (200, submitted.json()["id"])

    revoked = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=keys.admin)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert_problem(client.get("/v1/forget-requests", headers=bearer(fresh)), 401)
    again = client.post(f"/v1/admin/keys/{key_id}/revoke", headers=keys.admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert_problem(client.post(f"/v1/admin/keys/{key_id}/rotate", headers=keys.admin), 409)

    for bad in ("999999", "abc", "0", "99999999999", "1e3"):
        assert_problem(client.post(f"/v1/admin/keys/{bad}/revoke", headers=keys.admin), 404)
        assert_problem(client.post(f"/v1/admin/keys/{bad}/rotate", headers=keys.admin), 404)
    assert_problem(client.post(f"/v1/admin/keys/{key_id}/revoke", headers=keys.serve), 403)


def test_repeated_bad_keys_from_one_address_answer_429(client: TestClient, keys: Keys) -> None:
    """Before: every one of 200 bad keys answered 401."""
    state = client.app.state.lethe  # type: ignore[attr-defined]
    assert isinstance(state, AppState)
    limit = state.settings.auth_failure_limit
    for i in range(limit):
        assert_problem(client.get("/v1/admin/queue", headers=bearer(f"lethe_guess{i}")), 401)
    throttled = client.get("/v1/admin/queue", headers=bearer("lethe_guess-next"))
    assert_problem(throttled, 429)
    assert 1 <= int(throttled.headers["retry-after"]) <= state.settings.auth_failure_window_seconds
    # a valid key from the same address waits too (a known key must not unlock guessing)
    assert_problem(client.get("/v1/admin/queue", headers=keys.admin), 429)
    # another address is not affected
    assert state.auth_failures.retry_after("203.0.113.9") is None


def test_the_bad_key_window_slides() -> None:
    now = [1000.0]
    failures = AuthFailures(limit=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        assert failures.retry_after("a") is None
        failures.record("a")
        now[0] += 10
    assert failures.retry_after("a") == 30  # the first failure (t=1000) leaves the window at t=1060
    assert failures.retry_after("b") is None
    now[0] = 1060.0
    assert failures.retry_after("a") is None
    failures.record("a")
    assert failures.retry_after("a") == 10


def test_addresses_tracked_are_bounded() -> None:
    failures = AuthFailures(limit=1, window_seconds=60, max_addresses=2)
    for address in ("a", "b", "c"):
        failures.record(address)
    assert failures.retry_after("a") is None
    assert failures.retry_after("c") is not None


def test_cli_list_revoke_rotate(home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli.main, ["migrate"]).exit_code == 0
    created = runner.invoke(cli.main, ["keys", "create", "--scope", "serve", "--name", "edge"])
    secret = created.stdout.strip().splitlines()[0]

    listed = runner.invoke(cli.main, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.strip().splitlines()
    assert header.split("\t")[:5] == ["id", "prefix", "state", "scopes", "name"]
    assert row.split("\t")[:5] == ["1", secret[:12], "active", "serve", "edge"]
    assert secret not in listed.stdout

    rotated = runner.invoke(cli.main, ["keys", "rotate", "1"])
    assert rotated.exit_code == 0, rotated.output
    fresh = rotated.stdout.strip()
    engine = create_engine(f"sqlite:///{home / 'lethe.db'}")
    with Session(engine) as session:
        assert keys_repo.find_active(session, secret) is None
        found = keys_repo.find_active(session, fresh)
        assert found is not None
        assert found.id == 1
    assert runner.invoke(cli.main, ["keys", "revoke", "1"]).exit_code == 0
    with Session(engine) as session:
        assert keys_repo.find_active(session, fresh) is None
    engine.dispose()
    assert runner.invoke(cli.main, ["keys", "rotate", "1"]).exit_code == 1
    assert runner.invoke(cli.main, ["keys", "revoke", "7"]).exit_code == 1
    assert (
        runner.invoke(cli.main, ["keys", "list"]).stdout.strip().splitlines()[1].split("\t")[2] == "revoked"
    )
