"""Real concurrency against a real uvicorn server: one Idempotency-Key creates one request."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import ForgetRequest
from service.repositories import events as events_repo
from tests.service.conftest import Keys
from tests.service.helpers import client_body

pytestmark = pytest.mark.usefixtures("ready_model")
N = 6


def hammer(base_url: str, requests: list[tuple[dict[str, str], dict[str, Any]]]) -> list[httpx.Response]:
    barrier = threading.Barrier(len(requests))

    def one(item: tuple[dict[str, str], dict[str, Any]]) -> httpx.Response:
        headers, body = item
        with httpx.Client(base_url=base_url, timeout=30) as http:
            barrier.wait()
            return http.post("/v1/forget-requests", json=body, headers=headers)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def count_requests(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(ForgetRequest)) or 0)


def test_concurrent_posts_with_one_key_create_one_request(
    live_server: str, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    headers = {**keys.submit, "Idempotency-Key": "same"}
    responses = hammer(live_server, [(headers, client_body("c1"))] * N)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * (N - 1) + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count_requests(sessions) == 1
    with sessions() as session:
        assert events_repo.verify_chain(session).ok


def test_concurrent_posts_for_one_subject_queue_one_request(
    live_server: str, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    """One request is queued; every other submission is its own request (own id, key), merged into
    it (issue 9 item 4: before, they were answered with the first request and their keys dropped)."""
    items = [({**keys.submit, "Idempotency-Key": f"k{i}"}, client_body("c2")) for i in range(N)]
    responses = hammer(live_server, items)
    assert sorted(r.status_code for r in responses) == [200] * (N - 1) + [201]
    assert len({r.json()["id"] for r in responses}) == N
    with sessions() as session:
        rows = list(session.scalars(select(ForgetRequest)))
        queued = [r.id for r in rows if r.status == "queued"]
        assert len(queued) == 1
        assert [r.merged_into for r in rows if r.status == "merged"] == queued * (N - 1)
        assert events_repo.verify_chain(session).ok


def test_concurrent_posts_with_one_key_and_different_bodies(
    live_server: str, keys: Keys, sessions: sessionmaker[Session]
) -> None:
    headers = {**keys.submit, "Idempotency-Key": "same"}
    responses = hammer(live_server, [(headers, client_body(f"c{i % 3}")) for i in range(N)])
    codes = [r.status_code for r in responses]
    assert codes.count(201) == 1
    assert set(codes) <= {200, 201, 422}
    assert count_requests(sessions) == 1
