"""The event chain with pending submissions (issue 10 part 5: the chain lock off the POST path).

A submission writes its events pending; the sequencer (every chained append, the API's background
thread, the chain's readers) links them into the chain in id order under the chain lock. The chain
keeps its guarantees: every event exactly once, tampering detected, a request's submission events
chained before any worker event of it.
"""

from __future__ import annotations

import multiprocessing

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from service import lifecycle, rounds
from service.db.models import RequestEvent
from service.db.session import create_db_engine, make_session_factory, transaction
from service.repositories import events as events_repo
from service.sequencer import ChainSequencer
from tests.service.conftest import seed_ready_model


def _submit(session: Session, client_id: str, key: str | None = None) -> str:
    submission = lifecycle.Submission(model="digits", kind="client", client_id=client_id)
    result = lifecycle.submit(
        session, submission, idempotency_key=key or client_id, api_key_id=None, actor="t"
    )
    return result.request.id


def _chain(session: Session) -> list[RequestEvent]:
    return list(
        session.scalars(select(RequestEvent).where(RequestEvent.seq.is_not(None)).order_by(RequestEvent.seq))
    )


def test_a_submission_leaves_its_events_pending_and_the_sequencer_chains_them(
    sessions: sessionmaker[Session],
) -> None:
    seed_ready_model(sessions)
    with transaction(sessions) as session:
        request_id = _submit(session, "c0")
    with sessions() as session:
        pending = list(session.scalars(select(RequestEvent).order_by(RequestEvent.id)))
        assert [(e.type, e.seq, e.hash) for e in pending] == [
            ("received", None, None),
            ("queued", None, None),
        ]
        report = events_repo.verify_chain(session, chain_first=False)
        assert (report.ok, report.checked, report.pending) == (True, 0, 2)
    assert ChainSequencer(sessions, interval_seconds=0).run_once() == 2
    with sessions() as session:
        chained = _chain(session)
        assert [(e.request_id, e.type, e.seq) for e in chained] == [
            (request_id, "received", 1),
            (request_id, "queued", 2),
        ]
        assert chained[0].prev_hash == events_repo.GENESIS_HASH
        assert chained[1].prev_hash == chained[0].hash == events_repo.event_hash(chained[0])
        assert events_repo.verify_chain(session) == events_repo.ChainReport(True, 2, str(chained[1].hash))


def test_a_claim_chains_the_submission_events_before_its_own(sessions: sessionmaker[Session]) -> None:
    """The worker never records an event of a request whose submission events are not chained: the
    chained append behind ``claimed`` chains every committed pending event first."""
    seed_ready_model(sessions)
    with transaction(sessions) as session:
        request_id = _submit(session, "c1")
    with transaction(sessions) as session:
        claimed = rounds.claim_round(session, "digits", "w", lease_seconds=60, max_requests=4, max_attempts=3)
        assert claimed is not None
    with sessions() as session:
        chain = [(e.request_id, e.type) for e in _chain(session)]
        assert chain == [(request_id, "received"), (request_id, "queued"), (request_id, "claimed")]
        assert events_repo.verify_chain(session).ok


def test_tampering_with_a_chained_submission_event_is_detected(sessions: sessionmaker[Session]) -> None:
    seed_ready_model(sessions)
    with transaction(sessions) as session:
        _submit(session, "c0")
        _submit(session, "c1")
    with transaction(sessions) as session:
        assert events_repo.verify_chain(session).checked == 4
    with transaction(sessions) as session:
        victim = _chain(session)[1]
        session.execute(update(RequestEvent).where(RequestEvent.id == victim.id).values(actor="someone else"))
    with sessions() as session:
        report = events_repo.verify_chain(session)
        assert (report.ok, report.checked, report.first_broken_event_id) == (False, 1, victim.id)
    with transaction(sessions) as session:  # hiding a chained event as pending breaks the next link
        session.execute(
            update(RequestEvent).where(RequestEvent.id == victim.id).values(actor="t", seq=None, hash=None)
        )
    with sessions() as session:
        report = events_repo.verify_chain(session)
        assert report.ok is False
        assert "prev_hash" in str(report.reason)


@pytest.mark.postgres
def test_the_background_sequencer_gives_way_to_another_holder(sessions: sessionmaker[Session]) -> None:
    """Sequencers only try the chain lock: while another transaction holds it, ``run_once`` returns
    at once (None) instead of queueing behind it; afterwards it chains."""
    if sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("the chain lock is PostgreSQL's (SQLite serialises every transaction)")
    seed_ready_model(sessions)
    with transaction(sessions) as session:
        _submit(session, "c0")
    sequencer = ChainSequencer(sessions, interval_seconds=0)
    with transaction(sessions) as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": events_repo.CHAIN_LOCK_KEY})
        assert sequencer.run_once() is None
    assert sequencer.run_once() == 2


def _submit_from_process(url: str, prefix: str, clients: list[str], start: object) -> None:
    """One API-like process: submissions (pending), a chained append now and then, its sequencer."""
    engine = create_db_engine(url)
    sessions = make_session_factory(engine)
    sequencer = ChainSequencer(sessions, interval_seconds=0)
    start.wait()  # type: ignore[attr-defined]
    for i, client in enumerate(clients):
        with transaction(sessions) as session:
            request_id = _submit(session, client, key=f"{prefix}-{client}")
        if i % 4 == 0:
            with transaction(sessions) as session:
                events_repo.append_event(session, request_id, "noted", actor=prefix)
        if i % 3 == 0:
            sequencer.run_once()
    engine.dispose()


@pytest.mark.postgres
def test_submissions_from_two_processes_form_one_chain_with_every_event_once(
    sessions: sessionmaker[Session], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("two processes writing at once: PostgreSQL")
    per_process = 25
    seed_ready_model(sessions, clients=2 * per_process)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    processes = [
        ctx.Process(
            target=_submit_from_process,
            args=(database_url, f"p{p}", [f"c{p * per_process + i}" for i in range(per_process)], start),
        )
        for p in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    with sessions() as session:
        report = events_repo.verify_chain(session)
        total = session.scalar(select(func.count()).select_from(RequestEvent)) or 0
        seqs = list(session.scalars(select(RequestEvent.seq).order_by(RequestEvent.seq)))
        grouped = session.execute(select(RequestEvent.type, func.count()).group_by(RequestEvent.type))
        types = {str(name): int(count) for name, count in grouped}
    notes = 2 * len(range(0, per_process, 4))
    assert types == {"received": 2 * per_process, "queued": 2 * per_process, "noted": notes}
    assert (report.ok, report.pending, report.checked) == (True, 0, total)
    assert seqs == list(range(1, total + 1))  # every event once, no gap, no fork
