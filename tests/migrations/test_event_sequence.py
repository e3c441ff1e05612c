"""Migration 0010: events chained before it get their chain position ``seq = id`` and still verify."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select

from service import lifecycle
from service.db import migrate
from service.db.models import RequestEvent
from service.db.session import create_db_engine, make_session_factory, transaction
from service.repositories import events as events_repo
from tests.service.conftest import seed_ready_model

BEFORE = "0009_workload_options"


def _events_chained_before_0010_keep_their_chain(url: str) -> None:
    config = migrate.alembic_config(url)
    command.upgrade(config, "head")
    engine = create_db_engine(url)
    try:
        sessions = make_session_factory(engine)
        seed_ready_model(sessions)
        with transaction(sessions) as session:
            for client in ("c0", "c1"):
                submission = lifecycle.Submission(model="digits", kind="client", client_id=client)
                lifecycle.submit(session, submission, idempotency_key=client, api_key_id=None, actor="t")
        with transaction(sessions) as session:
            assert events_repo.verify_chain(session).checked == 4  # chained, as before 0010
        command.downgrade(config, BEFORE)
        command.upgrade(config, "head")
        with sessions() as session:
            rows = session.execute(select(RequestEvent.id, RequestEvent.seq).order_by(RequestEvent.id)).all()
            assert [seq for _, seq in rows] == [event_id for event_id, _ in rows]
            report = events_repo.verify_chain(session)
            assert (report.ok, report.checked, report.pending) == (True, 4, 0)
    finally:
        engine.dispose()


def test_events_chained_before_0010_keep_their_chain_sqlite(tmp_path: Path) -> None:
    _events_chained_before_0010_keep_their_chain(f"sqlite:///{tmp_path / 'lethe.db'}")


@pytest.mark.postgres
def test_events_chained_before_0010_keep_their_chain_postgres(
    make_postgres_database: Callable[[], str],
) -> None:
    _events_chained_before_0010_keep_their_chain(make_postgres_database())
