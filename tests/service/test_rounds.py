"""The queue protocol (service.rounds) on a real migrated database: order, exclusivity, leases."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import lifecycle, rounds
from service.db.models import AdapterVersion, Evidence, ForgetRequest, Model, Round, Sample, Subject, Worker
from service.db.session import transaction
from service.db.types import utcnow
from service.errors import ConflictError
from service.repositories import events as events_repo
from service.settings import Settings

LEASE = 60
DIGEST = rounds.FileDigest(sha256="0" * 64, size=1)
#: Retries at once: for tests about what is retried, not when.
NO_BACKOFF = rounds.RetryPolicy(max_attempts=10, base_seconds=0)


def submit_client(factory: sessionmaker[Session], client: str, key: str | None = None) -> str:
    with transaction(factory) as session:
        result = lifecycle.submit(
            session,
            lifecycle.Submission(model="digits", kind="client", client_id=client),
            idempotency_key=key or f"k-{client}",
            api_key_id=None,
            actor="test",
        )
        return result.request.id


def claim(factory: sessionmaker[Session], worker: str, **kw: int) -> rounds.ClaimedRound | None:
    with transaction(factory) as session:
        return rounds.claim_round(
            session,
            "digits",
            worker,
            lease_seconds=kw.get("lease_seconds", LEASE),
            max_requests=kw.get("max_requests", 2),
            max_attempts=kw.get("max_attempts", 3),
        )


def expire_lease(factory: sessionmaker[Session], round_id: int) -> None:
    with transaction(factory) as session:
        session.execute(
            update(Round).where(Round.id == round_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def publish(factory: sessionmaker[Session], claimed: rounds.ClaimedRound) -> rounds.PublishedVersion:
    with transaction(factory) as session:
        return rounds.publish_round(
            session,
            claimed,
            location=f"digits/adapters/{claimed.round_id}-{claimed.fencing_token}",
            files={"adapter_model.safetensors": DIGEST},
            evidence={r.id: {"auc": 0.5} for r in claimed.requests},
            withdraw_versions=[1],
        )


def statuses(factory: sessionmaker[Session], ids: list[str]) -> list[str]:
    with factory() as session:
        rows = {row.id: row.status for row in session.execute(select(ForgetRequest.id, ForgetRequest.status))}
        return [rows[i] for i in ids]


@pytest.mark.usefixtures("ready_model")
def test_claims_in_arrival_order_and_one_round_per_model(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, c) for c in ("c2", "c0", "c1")]
    first = claim(sessions, "w1")
    assert first is not None
    assert [r.id for r in first.requests] == ids[:2]
    assert first.parent_version == 1
    assert first.parent_location == "digits/adapters/v1"
    assert first.method == "ssd"
    assert first.method_config == {"alpha": 1.0}
    assert all(r.attempts == 1 and r.kind == "client" for r in first.requests)
    assert first.requests[0].tasks == ["digit", "parity"]
    # The lease is live: nobody else gets a round of this model, not even for the third request.
    assert claim(sessions, "w2") is None
    assert statuses(sessions, ids) == ["running", "running", "queued"]

    published = publish(sessions, first)
    assert (published.version, published.parent_version) == (2, 1)
    second = claim(sessions, "w2")
    assert second is not None
    assert [r.id for r in second.requests] == ids[2:]
    assert second.parent_version == 2
    assert second.fencing_token > first.fencing_token


@pytest.mark.usefixtures("ready_model")
def test_publish_completes_requests_and_records_evidence(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, "c0")]
    claimed = claim(sessions, "w1")
    assert claimed is not None
    with transaction(sessions) as session:
        rounds.mark_verifying(session, claimed)
    assert statuses(sessions, ids) == ["verifying"]
    publish(sessions, claimed)
    assert statuses(sessions, ids) == ["completed"]
    with sessions() as session:
        subject = session.scalars(select(Subject).where(Subject.client_id == "c0")).one()
        assert (subject.status, subject.forgotten_by_request_id) == ("forgotten", ids[0])
        versions = {v.version: v.status for v in session.scalars(select(AdapterVersion))}
        assert versions == {1: "withdrawn", 2: "active"}
        evidence = session.scalars(select(Evidence)).one()
        assert evidence.payload == {"auc": 0.5}
        assert session.get(Round, claimed.round_id) is not None
        assert events_repo.verify_chain(session).ok
        types = [e.type for e in events_repo.events_for_request(session, ids[0])]
        assert types == ["received", "queued", "claimed", "verifying", "completed"]
    with pytest.raises(ConflictError) as err:
        submit_client(sessions, "c0", key="again")
    assert err.value.extra["forgotten_by"] == ids[0]


@pytest.mark.usefixtures("ready_model")
def test_expired_lease_is_resumed_with_a_new_token_and_fences_the_old_holder(
    sessions: sessionmaker[Session],
) -> None:
    ids = [submit_client(sessions, "c0"), submit_client(sessions, "c1")]
    old = claim(sessions, "w1")
    assert old is not None
    expire_lease(sessions, old.round_id)
    with sessions() as session:
        assert rounds.models_to_wake(session) == ["digits"]

    new = claim(sessions, "w2")
    assert new is not None
    assert new.round_id == old.round_id
    assert [r.id for r in new.requests] == ids
    # a lost worker is a crash, counted apart from the attempts (method errors)
    assert [(r.attempts, r.crashes) for r in new.requests] == [(1, 1), (1, 1)]
    assert new.fencing_token > old.fencing_token
    assert new.worker_id == "w2"

    with pytest.raises(rounds.LeaseLost), transaction(sessions) as session:
        rounds.renew_lease(session, old, lease_seconds=LEASE)
    with pytest.raises(rounds.LeaseLost):
        publish(sessions, old)
    with pytest.raises(rounds.LeaseLost), transaction(sessions) as session:
        rounds.fail_round(session, old, error="x", retryable=True)
    # The fenced-off attempt changed nothing.
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AdapterVersion)) == 1
    assert publish(sessions, new).version == 2


@pytest.mark.usefixtures("ready_model")
def test_an_expired_lease_nobody_took_over_may_still_publish(sessions: sessionmaker[Session]) -> None:
    submit_client(sessions, "c0")
    claimed = claim(sessions, "w1")
    assert claimed is not None
    expire_lease(sessions, claimed.round_id)
    with transaction(sessions) as session:
        rounds.renew_lease(session, claimed, lease_seconds=LEASE)
    with sessions() as session:
        assert rounds.models_to_wake(session) == []
    assert publish(sessions, claimed).version == 2


@pytest.mark.usefixtures("ready_model")
def test_round_lease_expiring_too_often_fails_its_requests(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, "c0")]
    later = submit_client(sessions, "c1")
    claimed = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert claimed is not None
    expire_lease(sessions, claimed.round_id)
    again = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert again is not None
    assert again.round_id == claimed.round_id
    expire_lease(sessions, claimed.round_id)
    third = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert statuses(sessions, ids) == ["failed"]
    assert third is not None
    assert [r.id for r in third.requests] == [later]


@pytest.mark.usefixtures("ready_model")
def test_fail_round_requeues_in_order_or_fails(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, c) for c in ("c0", "c1", "c2")]
    claimed = claim(sessions, "w1", max_requests=1)
    assert claimed is not None
    with transaction(sessions) as session:
        rounds.fail_round(session, claimed, error="CUDA out of memory", retryable=True, retry=NO_BACKOFF)
    assert statuses(sessions, ids) == ["queued", "queued", "queued"]
    retried = claim(sessions, "w1", max_requests=1)
    assert retried is not None
    assert [r.id for r in retried.requests] == ids[:1]
    assert retried.requests[0].attempts == 2
    with transaction(sessions) as session:
        rounds.fail_round(session, retried, error="bad\x00input", retryable=False)
    assert statuses(sessions, ids) == ["failed", "queued", "queued"]
    with sessions() as session:
        request = session.scalars(select(ForgetRequest).where(ForgetRequest.id == ids[0])).one()
        assert request.error == "bad\ufffdinput"


@pytest.mark.usefixtures("ready_model")
def test_requests_over_max_attempts_fail_instead_of_being_claimed(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, c) for c in ("c0", "c1")]
    for _ in range(2):
        claimed = claim(sessions, "w1", max_requests=1, max_attempts=2)
        assert claimed is not None
        assert claimed.requests[0].id == ids[0]
        with transaction(sessions) as session:
            rounds.fail_round(session, claimed, error="flaky", retryable=True, retry=NO_BACKOFF)
    claimed = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert claimed is not None
    assert [r.id for r in claimed.requests] == ids[1:]
    assert statuses(sessions, ids) == ["failed", "running"]


@pytest.mark.usefixtures("ready_model")
def test_cancelled_requests_are_not_claimed(sessions: sessionmaker[Session]) -> None:
    ids = [submit_client(sessions, c) for c in ("c0", "c1")]
    with transaction(sessions) as session:
        lifecycle.cancel(session, ids[0], actor="admin")
    claimed = claim(sessions, "w1")
    assert claimed is not None
    assert [r.id for r in claimed.requests] == ids[1:]
    with pytest.raises(ConflictError), transaction(sessions) as session:
        lifecycle.cancel(session, ids[1], actor="admin")


@pytest.mark.usefixtures("ready_model")
def test_database_allows_one_live_round_per_model(sessions: sessionmaker[Session]) -> None:
    submit_client(sessions, "c0")
    assert claim(sessions, "w1") is not None
    with transaction(sessions) as session:
        model_id = session.scalars(select(Model.id)).one()
        session.add(Round(model_id=model_id, status="running", method="ssd", fencing_token=99))
        with pytest.raises(IntegrityError):
            session.flush()
        session.rollback()


@pytest.mark.usefixtures("ready_model")
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_claimer_skips_a_model_another_claimer_holds(sessions: sessionmaker[Session]) -> None:
    """PostgreSQL: while one claimer holds the model row, a second gets None at once (SKIP LOCKED).

    (SQLite serialises whole transactions with BEGIN IMMEDIATE instead.)
    """
    submit_client(sessions, "c0")
    with transaction(sessions) as first:
        claimed = rounds.claim_round(
            first, "digits", "w1", lease_seconds=LEASE, max_requests=4, max_attempts=3
        )
        assert claimed is not None
        with transaction(sessions) as second:
            assert (
                rounds.claim_round(
                    second, "digits", "w2", lease_seconds=LEASE, max_requests=4, max_attempts=3
                )
                is None
            )


def test_models_to_wake(sessions: sessionmaker[Session], ready_model: str) -> None:
    with sessions() as session:
        assert rounds.models_to_wake(session) == []
    submit_client(sessions, "c0")
    with sessions() as session:
        assert rounds.models_to_wake(session) == [ready_model]
    assert claim(sessions, "w1") is not None
    with sessions() as session:
        assert rounds.models_to_wake(session) == []


def test_unknown_or_unready_models_are_not_claimed(sessions: sessionmaker[Session]) -> None:
    assert claim(sessions, "w1") is None
    with transaction(sessions) as session:
        session.add(Model(name="digits", workload="w", method="ssd", status="preparing"))
    assert claim(sessions, "w1") is None


@pytest.mark.usefixtures("ready_model")
def test_register_prepared_model_is_idempotent_and_records_subjects(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        again = rounds.register_prepared_model(
            session, "digits", subjects={"zz": ["s1"]}, location="other", files={}, evidence={}
        )
        assert (again.version, again.location) == (1, "digits/adapters/v1")
        model = session.scalars(select(Model)).one()
        assert (model.status, model.tasks, model.base_location) == (
            "ready",
            ["digit", "parity"],
            "digits/base",
        )
        assert model.base_files == {"model.safetensors": {"sha256": "0" * 64, "size": 1}}
        assert session.scalar(select(func.count()).select_from(Subject)) == 3
        assert session.scalar(select(func.count()).select_from(Sample)) == 12
    with pytest.raises(rounds.UnknownModelError), transaction(sessions) as session:
        rounds.register_prepared_model(session, "nope", subjects={}, location="x", files={}, evidence={})
    with transaction(sessions) as session:
        rounds.mark_model_failed(session, "digits", error="boom")


@pytest.mark.usefixtures("ready_model")
def test_mark_purged(sessions: sessionmaker[Session]) -> None:
    """A sample whose every task's label was purged is recorded as purged whole: the data store
    deletes its inputs then (issue 9 item 1: the inputs go once nothing of them is kept)."""
    with transaction(sessions) as session:
        rounds.mark_purged(session, "digits", client_ids=["c0"], sample_tasks=[("s00004", "parity")])
    with sessions() as session:
        samples = {s.sample_id: s for s in session.scalars(select(Sample))}
        assert samples["s00000"].purged
        assert not samples["s00004"].purged
    with transaction(sessions) as session:
        rounds.mark_purged(session, "digits", client_ids=[], sample_tasks=[("s00004", "digit")])
    with sessions() as session:
        samples = {s.sample_id: s for s in session.scalars(select(Sample))}
        assert samples["s00004"].purged
        assert samples["s00004"].purged_tasks == ["digit", "parity"]
        subject = session.scalars(select(Subject).where(Subject.client_id == "c0")).one()
        assert subject.purged_at is not None


def test_heartbeat_upserts(sessions: sessionmaker[Session]) -> None:
    for state in ("idle", "busy"):
        with transaction(sessions) as session:
            rounds.heartbeat(session, "w1", hostname="gpu-1", queues=["lethe-gpu"], state=state)
    with sessions() as session:
        worker = session.scalars(select(Worker)).one()
        assert (worker.state, worker.queues, worker.hostname) == ("busy", ["lethe-gpu"], "gpu-1")


@pytest.mark.usefixtures("ready_model")
def test_racing_claimers_get_one_round(sessions: sessionmaker[Session]) -> None:
    """Real threads, one session each: exactly one claimer wins the model."""
    for c in ("c0", "c1", "c2"):
        submit_client(sessions, c)
    barrier = threading.Barrier(4)

    def race(worker: str) -> rounds.ClaimedRound | None:
        barrier.wait()
        return claim(sessions, worker, max_requests=4)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(race, [f"w{i}" for i in range(4)]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert len(winners[0].requests) == 3
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Round)) == 1


def _events(factory: sessionmaker[Session], request_id: str) -> list[tuple[str, dict[str, Any]]]:
    with factory() as session:
        return [(e.type, dict(e.detail)) for e in events_repo.events_for_request(session, request_id)]


def _request(factory: sessionmaker[Session], request_id: str) -> ForgetRequest:
    with factory() as session:
        return session.scalars(select(ForgetRequest).where(ForgetRequest.id == request_id)).one()


def test_retry_policy_backs_off_exponentially_with_jitter_over_minutes() -> None:
    """Issue 9 item 2: the delays double from the base, are capped, keep at least half of each step,
    and the default policy spreads its retries over minutes (not 100 ms)."""
    policy = rounds.RetryPolicy()
    assert [policy.delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [15, 30, 60, 120, 240, 300]
    assert [policy.delay(n, rand=lambda: 0.0) for n in (1, 2, 3)] == [7.5, 15, 30]
    shortest_window = sum(policy.delay(n, rand=lambda: 0.0) for n in range(1, policy.max_attempts))
    assert shortest_window >= 100


@pytest.mark.usefixtures("ready_model")
def test_a_retryable_failure_waits_its_backoff_and_holds_the_queue_in_order(
    sessions: sessionmaker[Session],
) -> None:
    """Issue 9 item 2 (failed on 5a93ed6: a retryable failure was re-claimed at once): the request
    is requeued with a not-before time; neither it nor the request behind it is claimed or woken
    before that time; then it is claimed first."""
    ids = [submit_client(sessions, c) for c in ("c0", "c1")]
    claimed = claim(sessions, "w1", max_requests=1)
    assert claimed is not None
    before = utcnow()
    with transaction(sessions) as session:
        rounds.fail_round(session, claimed, error="OSError: rename failed", retryable=True)
    waiting = _request(sessions, ids[0])
    assert waiting.status == "queued"
    assert waiting.not_before is not None
    assert before + timedelta(seconds=7.5) <= waiting.not_before <= utcnow() + timedelta(seconds=15)
    requeued = [d for t, d in _events(sessions, ids[0]) if t == "requeued"]
    assert requeued
    assert 7.5 <= requeued[0]["retry_in_seconds"] <= 15
    assert claim(sessions, "w1", max_requests=2) is None
    with sessions() as session:
        assert rounds.models_to_wake(session) == []
    with transaction(sessions) as session:
        session.execute(
            update(ForgetRequest)
            .where(ForgetRequest.id == ids[0])
            .values(not_before=utcnow() - timedelta(seconds=1))
        )
    with sessions() as session:
        assert rounds.models_to_wake(session) == ["digits"]
    again = claim(sessions, "w1", max_requests=2)
    assert again is not None
    assert [r.id for r in again.requests] == ids
    assert _request(sessions, ids[0]).not_before is None


@pytest.mark.usefixtures("ready_model")
def test_crashes_are_counted_apart_and_a_final_failure_is_visible(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9 item 2 (failed on 5a93ed6: a lost worker used up a method attempt, and nobody was
    told): crashes do not use attempts; the last method error fails the request for good with a
    'failed' event naming the cause and one log line."""
    [request_id] = [submit_client(sessions, "c0")]
    claimed = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert claimed is not None
    for _ in range(2):  # two workers lost
        expire_lease(sessions, claimed.round_id)
        with transaction(sessions) as session:
            resumed = rounds.claim_round(
                session, "digits", "w2", lease_seconds=LEASE, max_requests=1, max_attempts=2, max_crashes=2
            )
        assert resumed is not None
        claimed = resumed
    assert (claimed.requests[0].attempts, claimed.requests[0].crashes) == (1, 2)
    policy = rounds.RetryPolicy(max_attempts=2, base_seconds=0)
    with transaction(sessions) as session:
        rounds.fail_round(session, claimed, error="OSError: disk full", retryable=True, retry=policy)
    retried = claim(sessions, "w1", max_requests=1, max_attempts=2)
    assert retried is not None
    assert retried.requests[0].attempts == 2
    with caplog.at_level("WARNING", logger="service.rounds"), transaction(sessions) as session:
        rounds.fail_round(session, retried, error="OSError: disk full", retryable=True, retry=policy)
    assert statuses(sessions, [request_id]) == ["failed"]
    failed = [d for t, d in _events(sessions, request_id) if t == "failed"]
    assert len(failed) == 1
    assert failed[0]["cause"] == "attempts"
    assert (failed[0]["attempts"], failed[0]["crashes"]) == (2, 2)
    assert "disk full" in failed[0]["error"]
    lines = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert len(lines) == 1
    assert request_id in lines[0]


@pytest.mark.usefixtures("ready_model")
def test_a_killed_workers_round_is_taken_over_after_the_short_default_lease(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 10 (failed on 5a93ed6: the default lease was 600 s): with the production
    defaults a round whose worker was killed (it stops renewing) is taken over once its 60 s lease
    ran out, and the holder renews it every 15 s."""
    defaults = Settings()
    assert (defaults.lease_seconds, defaults.lease_renew_interval) == (60, 15)
    submit_client(sessions, "c0")
    with transaction(sessions) as session:
        killed = rounds.claim_round(
            session, "digits", "w1", lease_seconds=defaults.lease_seconds, max_requests=1,
            max_attempts=defaults.max_attempts, max_crashes=defaults.max_crashes,
        )  # fmt: skip
    assert killed is not None
    start = utcnow()

    def take_over_at(seconds: float) -> rounds.ClaimedRound | None:
        monkeypatch.setattr(rounds, "utcnow", lambda: start + timedelta(seconds=seconds))
        with transaction(sessions) as session:
            return rounds.claim_round(
                session, "digits", "w2", lease_seconds=defaults.lease_seconds, max_requests=1,
                max_attempts=defaults.max_attempts, max_crashes=defaults.max_crashes,
            )  # fmt: skip

    assert take_over_at(55) is None
    with sessions() as session:
        assert rounds.models_to_wake(session) == []
    taken = take_over_at(61)
    assert taken is not None
    assert (taken.round_id, taken.worker_id) == (killed.round_id, "w2")
    assert taken.fencing_token > killed.fencing_token


# --- progress (issue 10 part 3) and several workers (part 7) --------------------------------------


def _progress(factory: sessionmaker[Session], round_id: int) -> tuple[str | None, int | None, int | None]:
    with factory() as session:
        row = session.get(Round, round_id)
        assert row is not None
        return row.progress_stage, row.progress_step, row.progress_of


@pytest.mark.usefixtures("ready_model")
def test_progress_is_recorded_by_the_holder_only_and_starts_over_on_resume(
    sessions: sessionmaker[Session],
) -> None:
    """Issue 10 part 3: the round's stage is recorded under its fencing token (a taken-over worker
    writes nothing), bad stages or steps are refused, and a resumed round starts without the old
    attempt's stage."""
    submit_client(sessions, "c0")
    old = claim(sessions, "w1")
    assert old is not None
    assert _progress(sessions, old.round_id) == (None, None, None)
    with transaction(sessions) as session:
        assert rounds.record_progress(session, old, stage="update", step=3, of=10)
    assert _progress(sessions, old.round_id) == ("update", 3, 10)
    for stage, step, of in (("training", 0, 0), ("update", 11, 10), ("update", -1, 0)):
        with pytest.raises(ValueError, match=r"stage|step"), transaction(sessions) as session:
            rounds.record_progress(session, old, stage=stage, step=step, of=of)
    expire_lease(sessions, old.round_id)
    new = claim(sessions, "w2")
    assert new is not None
    assert _progress(sessions, new.round_id) == (None, None, None)
    with transaction(sessions) as session:
        assert not rounds.record_progress(session, old, stage="audit", step=1, of=1)
        assert rounds.record_progress(session, new, stage="partitions", step=1, of=1)
    assert _progress(sessions, new.round_id) == ("partitions", 1, 1)


def _submit_to(factory: sessionmaker[Session], model: str, client: str) -> str:
    with transaction(factory) as session:
        result = lifecycle.submit(
            session,
            lifecycle.Submission(model=model, kind="client", client_id=client),
            idempotency_key=f"{model}-{client}",
            api_key_id=None,
            actor="test",
        )
        return result.request.id


def _claim_model(factory: sessionmaker[Session], model: str, worker: str) -> rounds.ClaimedRound | None:
    with transaction(factory) as session:
        return rounds.claim_round(session, model, worker, lease_seconds=LEASE, max_requests=4, max_attempts=3)


def test_models_run_in_parallel_while_one_models_rounds_stay_serial(sessions: sessionmaker[Session]) -> None:
    """Issue 10 part 7 (several GPU workers): each model has at most one live round, but a model's
    round never holds back another model's. Workers w1..w4 claim concurrently (real threads, one
    session each): exactly one round per model, both live at once; the losers get nothing until
    the holder publishes."""
    from tests.service.conftest import seed_ready_model

    seed_ready_model(sessions, "alpha")
    seed_ready_model(sessions, "beta")
    for model in ("alpha", "beta"):
        for c in ("c0", "c1"):
            _submit_to(sessions, model, c)
    barrier = threading.Barrier(4)

    def race(job: tuple[str, str]) -> rounds.ClaimedRound | None:
        model, worker = job
        barrier.wait()
        return _claim_model(sessions, model, worker)

    jobs = [("alpha", "w1"), ("alpha", "w2"), ("beta", "w3"), ("beta", "w4")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(race, jobs))
    winners = {r.model_name: r for r in results if r is not None}
    assert sorted(winners) == ["alpha", "beta"]
    assert sum(r is not None for r in results) == 2
    with sessions() as session:
        live = session.scalars(select(Round.model_id).where(Round.status == "running")).all()
        assert len(live) == 2  # both models' rounds run at the same time
    assert _claim_model(sessions, "alpha", "w5") is None  # alpha's next round waits for its first
    _submit_to(sessions, "alpha", "c2")
    assert _claim_model(sessions, "alpha", "w5") is None
    with transaction(sessions) as session:
        rounds.publish_round(
            session,
            winners["alpha"],
            location="alpha/adapters/x",
            files={"adapter_model.safetensors": DIGEST},
            evidence={r.id: {} for r in winners["alpha"].requests},
            withdraw_versions=[1],
        )
    following = _claim_model(sessions, "alpha", "w5")
    assert following is not None
    assert following.parent_version == 2  # on top of the version the first round published
