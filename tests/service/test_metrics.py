"""Issue 10 part 1: ``/metrics`` reads the queue state from the database at scrape time, on
SQLite and PostgreSQL alike, so that several API processes agree (no per-process queue state)."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.db.models import ForgetRequest
from service.db.session import transaction
from service.db.types import utcnow
from service.settings import Settings
from tests.service.conftest import Keys
from tests.service.helpers import client_body


def _gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_queue_gauges_agree_across_processes(
    client: TestClient, settings: Settings, keys: Keys, ready_model: str, sessions: sessionmaker[Session]
) -> None:
    before = _gauges(client.get("/metrics").text)
    assert before[("lethe_queue_depth", (("model", ready_model),))] == 0
    assert before[("lethe_requests_overdue", (("model", ready_model),))] == 0
    assert before[("lethe_queue_oldest_age_seconds", (("model", ready_model),))] == 0
    for c in ("c0", "c1"):
        response = client.post(
            "/v1/forget-requests", json=client_body(c), headers={**keys.submit, "Idempotency-Key": f"k-{c}"}
        )
        assert response.status_code in (201, 202), response.text
    with transaction(sessions) as session:
        session.execute(update(ForgetRequest).values(due_at=utcnow() - timedelta(seconds=5)))
    # a second API process (another app on the same database) reports the same numbers
    with TestClient(create_app(settings)) as other:
        for scraper in (client, other):
            gauges = _gauges(scraper.get("/metrics").text)
            assert gauges[("lethe_queue_depth", (("model", ready_model),))] == 2
            assert gauges[("lethe_requests_overdue", (("model", ready_model),))] == 2
            assert gauges[("lethe_requests", (("model", ready_model), ("status", "queued")))] == 2
            assert gauges[("lethe_adapter_versions", (("model", ready_model), ("status", "active")))] == 1
            assert 0 <= gauges[("lethe_queue_oldest_age_seconds", (("model", ready_model),))] < 60
