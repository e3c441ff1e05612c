"""The round pipeline against a real (SQLite) database with a stand-in engine: fencing and cleanup.

No torch here: ``pipeline._run_engine`` is replaced by a function that writes adapter files, so
these tests exercise claim → seal → publish → withdraw and the lease-takeover path quickly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import event, select, update

from service import lifecycle, registry, rounds
from service.db.migrate import upgrade
from service.db.models import ForgetRequest, Round, Sample
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from tests.worker.requests import submit_client
from worker import cleanup, pipeline, round_job
from worker import context as worker_context
from worker.artifacts import STATE_FILE, verify_directory
from worker.config import WorkerSettings
from worker.watchdog import RoundWatchdog

MODEL = "m1"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[pipeline.WorkerContext]:
    # retries without backoff: these tests are about what is retried (backoff: tests/service/test_rounds.py)
    settings = Settings(home=tmp_path / "home", database_url=None, retry_base_seconds=0)
    upgrade(settings.resolved_database_url)
    context = pipeline.WorkerContext.create(settings, WorkerSettings(device="cpu"), worker_id="w1")
    _register(context, MODEL, {"c0": ["s0", "s1"], "c1": ["s2", "s3"]}, ["t"])
    yield context
    context.close()


def _submit(ctx: pipeline.WorkerContext, client: str) -> str:
    return submit_client(ctx, MODEL, client)


EngineHook = Callable[[rounds.ClaimedRound, RoundWatchdog], None]


def _fake_engine(
    before_return: EngineHook | None = None, next_importance: Callable[[], float] | None = None
) -> Callable[..., round_job.EngineResult]:
    """Stands in for ``pipeline._run_engine``: writes two adapter files, calls ``before_return``;
    returns ``next_importance`` as the round's work to do after publishing."""

    def run(
        _ctx: object, claimed: rounds.ClaimedRound, *, staging: Path, watchdog: RoundWatchdog, **_: object
    ) -> round_job.EngineResult:
        (staging / "adapter_model.safetensors").write_bytes(f"round {claimed.round_id}".encode())
        (staging / "adapter_config.json").write_text("{}")
        (staging / STATE_FILE).write_text(
            json.dumps({"forgotten_clients": [r.client_id for r in claimed.requests]})
        )
        if before_return is not None:
            before_return(claimed, watchdog)
        return round_job.EngineResult({r.id: {"fake": True} for r in claimed.requests}, next_importance)

    return run


def _request_status(ctx: pipeline.WorkerContext, request_id: str) -> str:
    with transaction(ctx.session_factory) as session:
        request = requests_repo.get_request(session, request_id)
        assert request is not None
        return request.status


def _versions(ctx: pipeline.WorkerContext) -> list[tuple[int, str]]:
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        return [(v.version, v.status) for v in versions_repo.list_versions(session, model.id)]


def _expire_leases(ctx: pipeline.WorkerContext) -> None:
    with transaction(ctx.session_factory) as session:
        session.execute(update(Round).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_round_publishes_and_withdraws(ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    request_id = _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert result.version == 2
    assert result.withdrawn == [1]
    store = ctx.artifacts(MODEL)
    new_dir = store.adapters_dir / f"{result.round_id}-{result.fencing_token}"
    verify_directory(new_dir)
    assert store.tombstone_path(1).exists()
    assert not (store.adapters_dir / "0-1").exists()
    assert pipeline.run_one_round(ctx, MODEL) is None  # nothing left to claim
    assert _request_status(ctx, request_id) == "completed"
    assert _versions(ctx) == [(1, "withdrawn"), (2, "active")]


def test_next_importance_is_computed_after_publishing(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect: the next request's full-data importance was computed inside the round, before the
    version was published (16–21 s of a 70 s scenes round on the POST → served path). It runs
    after publishing now, and its failure never fails the published round."""
    seen: list[tuple[int, str]] = []
    request_id = _submit(ctx, "c0")

    def after() -> float:
        seen.append((_versions(ctx)[-1][0], _request_status(ctx, request_id)))
        return 0.5

    monkeypatch.setattr(round_job, "_run_engine", _fake_engine(next_importance=after))
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert seen == [(2, "completed")]  # v2 published and the request completed before it ran

    def broken() -> float:
        raise RuntimeError("no memory left")

    monkeypatch.setattr(round_job, "_run_engine", _fake_engine(next_importance=broken))
    _submit(ctx, "c1")
    with caplog.at_level(logging.WARNING, logger=round_job.log.name):
        result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert _versions(ctx)[-1] == (3, "active")
    assert "computing the next importance ahead failed" in caplog.text


def test_unlearning_state_is_kept_worker_side_not_served(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 12: ``unlearning_state.json`` (the forgotten ids) is neither in the published
    version's directory nor in its served file list; the worker keeps it in ``state/`` for the next
    round, deletes it with its withdrawn version, and collects orphans' states."""
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    store = ctx.artifacts(MODEL)
    (store.state_dir / "9-9.json").write_text("{}")  # the state of a crashed attempt's version
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        latest = versions_repo.latest_active(session, model.id)
        assert latest is not None
        files, location = dict(latest.files), latest.location
    assert STATE_FILE not in files
    assert not (store.resolve(location) / STATE_FILE).exists()
    verify_directory(store.resolve(location))
    kept = store.state_file(location)
    assert kept == store.state_path(location)
    assert json.loads(kept.read_text()) == {"forgotten_clients": ["c0"]}
    assert sorted(p.name for p in store.state_dir.iterdir()) == [kept.name]  # v1's and the orphan's gone


def _register(
    ctx: pipeline.WorkerContext, name: str, subjects: dict[str, list[str]], tasks: list[str]
) -> None:
    store = ctx.artifacts(name)
    staging = store.staging_dir("0-1")
    (staging / "adapter_model.safetensors").write_bytes(b"v1")
    (staging / STATE_FILE).write_text("{}")
    store.keep_state(staging, "0-1")
    v1 = store.commit(staging, "0-1", parent_version=None, requests=[], evidence={})
    with transaction(ctx.session_factory) as session:
        registry.register(
            session, name, workload="digits-clients", method="default", method_config={}, settings={}
        )
        rounds.register_prepared_model(
            session,
            name,
            subjects=subjects,
            location=v1.location,
            files={k: rounds.FileDigest(v.sha256, v.size) for k, v in v1.files.items()},
            evidence={},
            tasks=tasks,
        )


def test_reconcile_deletes_inputs_left_by_a_purge_of_every_label(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 1: a store purged before inputs were deleted once every label is (rows with no
    label left, recorded as labels only) is caught up: reconciliation deletes those inputs."""
    from worker.unlearning.datastore import DataStore

    subjects = _toy_model(ctx)
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    u1 = subjects["u1"]
    with monkeypatch.context() as old:
        old.setattr(DataStore, "_purge_samples", lambda *_: None)  # the purge before this change
        with transaction(ctx.session_factory) as session:
            lifecycle.submit(
                session,
                lifecycle.Submission(model="toy", kind="task", sample_ids=u1[:2], tasks=["kind", "side"]),
                idempotency_key="k1", api_key_id=None, actor="t",
            )  # fmt: skip
        result = pipeline.run_one_round(ctx, "toy")
        assert result is not None
        assert result.status == "published"
    with transaction(ctx.session_factory) as session:
        session.execute(update(Sample).values(purged=False))  # recorded as before: labels only
        # and, as before migration 0003, no request's purge recorded as done
        session.execute(update(ForgetRequest).values(purged_at=None))
    assert DataStore(ctx.data_dir("toy")).sample_ids_of("u1")[:2] == u1[:2]
    pipeline.reconcile(ctx, "toy")
    assert DataStore(ctx.data_dir("toy")).sample_ids_of("u1") == u1[2:]
    with transaction(ctx.session_factory) as session:
        purged = {
            s.sample_id: s.purged for s in session.scalars(select(Sample).where(Sample.client_id == "u1"))
        }
    assert [purged[s] for s in u1[:3]] == [True, True, False]
    assert pipeline.purge_completed(ctx, "toy") == []  # nothing due any more


def _toy_model(ctx: pipeline.WorkerContext) -> dict[str, list[str]]:
    """Model "toy": the toy workload's clients, samples and tasks, its real data store, a fake v1."""
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.workloads.toy import ToyWorkload

    workload = ToyWorkload()
    data = workload.client_data()
    subjects: dict[str, list[str]] = {}
    for sample_id, client in zip(data.sample_ids, data.client_ids, strict=True):
        assert client is not None
        subjects.setdefault(client, []).append(sample_id)
    DataStore.materialise(ctx.data_dir("toy"), workload)
    _register(ctx, "toy", subjects, [t.name for t in workload.tasks()])
    return subjects


def test_partial_client_erasure_purges_exactly_its_scope(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9 item 1, end to end through the pipeline and the real data store: a client request for
    one task leaves the client active, purges that task's labels only; a per-task request for the
    other task on some of its samples deletes those samples' inputs (nothing of them is kept); a
    later whole-client request proceeds and deletes the rest. Logs name requests, not subjects."""
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.types import IGNORE

    subjects = _toy_model(ctx)
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    u1 = subjects["u1"]

    def submit(key: str, submission: lifecycle.Submission) -> str:
        with transaction(ctx.session_factory) as session:
            result = lifecycle.submit(session, submission, idempotency_key=key, api_key_id=None, actor="t")
            return result.request.id

    def run() -> None:
        result = pipeline.run_one_round(ctx, "toy")
        assert result is not None
        assert result.status == "published"

    caplog.set_level(logging.INFO, logger="worker.cleanup")
    first = submit("k1", lifecycle.Submission(model="toy", kind="client", client_id="u1", tasks=["kind"]))
    run()
    shard = DataStore(ctx.data_dir("toy")).client_samples("u1")
    assert shard is not None
    assert shard.sample_ids == u1  # the inputs stay: their "side" labels are kept
    assert bool((shard.labels["kind"] == IGNORE).all())
    assert not bool((shard.labels["side"] == IGNORE).any())
    assert first in caplog.text
    assert "u1" not in caplog.text
    assert not any(s in caplog.text for s in u1)

    submit("k2", lifecycle.Submission(model="toy", kind="task", sample_ids=u1[:2], tasks=["side"]))
    run()
    shard = DataStore(ctx.data_dir("toy")).client_samples("u1")
    assert shard is not None
    assert shard.sample_ids == u1[2:]  # nothing of the first two is kept: their rows are gone
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, "toy")
        assert model is not None
        samples = models_repo.find_samples(session, model.id, u1[:3])
        assert [samples[s].purged for s in u1[:3]] == [True, True, False]
        subject = models_repo.get_subject(session, model.id, "u1")
        assert subject is not None
        assert (subject.status, subject.forgotten_tasks) == ("active", ["kind"])

    submit("k3", lifecycle.Submission(model="toy", kind="client", client_id="u1"))  # wider: proceeds
    run()
    store = DataStore(ctx.data_dir("toy"))
    assert store.client_samples("u1") is None
    assert not (ctx.data_dir("toy") / "clients" / "u1.npz").exists()
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, "toy")
        assert model is not None
        subject = models_repo.get_subject(session, model.id, "u1")
        assert subject is not None
        assert (subject.status, subject.purged_at is not None) == ("forgotten", True)
    assert "u1" not in caplog.text


def test_taken_over_worker_cannot_publish(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1's lease expires mid-round and worker 2 resumes the round: worker 1's publish is
    refused (LeaseLost), its directory discarded; worker 2 publishes the one new version."""
    ctx2 = pipeline.WorkerContext(
        settings=ctx.settings,
        worker_settings=ctx.worker_settings,
        session_factory=ctx.session_factory,
        worker_id="w2",
    )
    taken: list[rounds.ClaimedRound] = []

    def take_over(claimed: rounds.ClaimedRound, _: RoundWatchdog) -> None:
        _expire_leases(ctx)
        resumed = pipeline.claim(ctx2, MODEL)
        assert resumed is not None
        assert resumed.round_id == claimed.round_id
        assert resumed.fencing_token > claimed.fencing_token
        taken.append(resumed)

    monkeypatch.setattr(round_job, "_run_engine", _fake_engine(take_over))
    _submit(ctx, "c1")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "lease_lost"
    assert result.version is None
    store = ctx.artifacts(MODEL)
    leftovers = [p.name for p in store.adapters_dir.iterdir() if p.name != "0-1"]
    assert leftovers == []  # the fenced-off attempt discarded its directories
    # worker 2's claim is live; let it lapse, and a fresh run by worker 2 resumes and publishes
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    _expire_leases(ctx)
    result2 = pipeline.run_one_round(ctx2, MODEL)
    assert result2 is not None
    assert result2.status == "published"
    assert result2.version == 2
    assert result2.fencing_token > taken[0].fencing_token
    assert _versions(ctx) == [(1, "withdrawn"), (2, "active")]


def test_gc_collects_orphans_of_crashed_attempts(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ctx.artifacts(MODEL)
    orphan = store.adapters_dir / "9-9"
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"crashed")
    staging = store.staging_dir("9-10")
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert not orphan.exists()
    assert not staging.exists()


def test_engine_error_requeues_then_fails_at_the_attempt_cap(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> round_job.EngineResult:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(round_job, "_run_engine", boom)
    request_id = _submit(ctx, "c0")
    statuses = []
    for _ in range(ctx.settings.max_attempts + 1):
        result = pipeline.run_one_round(ctx, MODEL)
        statuses.append(None if result is None else result.status)
    assert statuses == ["failed"] * ctx.settings.max_attempts + [None]
    with transaction(ctx.session_factory) as session:
        request = requests_repo.get_request(session, request_id)
        assert request is not None
        assert request.status == "failed"
        assert "CUDA out of memory" in (request.error or "")
    assert [p.name for p in ctx.artifacts(MODEL).adapters_dir.iterdir()] == ["0-1"]


def _variant(ctx: pipeline.WorkerContext, **changes: Any) -> pipeline.WorkerContext:
    """Another worker on the same database: settings / worker settings / id / hook replaced."""
    return dataclasses.replace(ctx, engine=None, **changes)


def _evidence_rows(ctx: pipeline.WorkerContext, request_id: str) -> int:
    with transaction(ctx.session_factory) as session:
        return len(versions_repo.evidence_for_request(session, request_id))


def _adapter_dirs(ctx: pipeline.WorkerContext) -> list[str]:
    return sorted(p.name for p in ctx.artifacts(MODEL).adapters_dir.iterdir())


def test_taken_over_after_sealing_cannot_publish(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is taken over after worker 1 sealed its version (renamed into place) and before it
    published: publish_round refuses the stale fencing token, the sealed directory is discarded and
    nothing is published; worker 2 then publishes the one new version, one evidence row."""
    ctx2 = _variant(ctx, worker_id="w2")
    sealed: list[Path] = []

    def take_over_after_sealing(event: str, details: dict[str, Any]) -> None:
        if event == "committed":
            sealed.append(Path(details["path"]))
            assert sealed[0].is_dir()
            _expire_leases(ctx)
            assert pipeline.claim(ctx2, MODEL) is not None

    ctx1 = _variant(ctx, hook=take_over_after_sealing)
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    request_id = _submit(ctx, "c1")
    result = pipeline.run_one_round(ctx1, MODEL)
    assert result is not None
    assert result.status == "lease_lost"
    assert "taken over" in (result.error or "")
    assert sealed
    assert not sealed[0].exists()
    assert _adapter_dirs(ctx) == ["0-1"]
    assert _versions(ctx) == [(1, "active")]
    assert _request_status(ctx, request_id) == "running"  # worker 2 holds it
    _expire_leases(ctx)
    result2 = pipeline.run_one_round(ctx2, MODEL)
    assert result2 is not None
    assert result2.status == "published"
    assert _versions(ctx) == [(1, "withdrawn"), (2, "active")]
    assert _request_status(ctx, request_id) == "completed"
    assert _evidence_rows(ctx, request_id) == 1


def test_lease_loss_seen_by_the_watchdog_stops_the_engine(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog's renewal finds the round taken over; the engine's next progress check raises
    LeaseLost and the round stops before sealing anything."""
    short_lease = _variant(ctx, settings=ctx.settings.model_copy(update={"lease_seconds": 3}))
    ctx2 = _variant(ctx, worker_id="w2")
    seen: list[BaseException] = []

    def taken_over_mid_engine(_: rounds.ClaimedRound, watchdog: RoundWatchdog) -> None:
        _expire_leases(ctx)
        assert pipeline.claim(ctx2, MODEL) is not None
        deadline = time.monotonic() + 10
        while watchdog.lease_lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watchdog.lease_lost is not None
        seen.append(watchdog.lease_lost)
        watchdog.check()  # what the engine's progress callback does

    monkeypatch.setattr(round_job, "_run_engine", _fake_engine(taken_over_mid_engine))
    _submit(ctx, "c0")
    result = pipeline.run_one_round(short_lease, MODEL)
    assert result is not None
    assert result.status == "lease_lost"
    assert isinstance(seen[0], rounds.LeaseLost)
    assert _adapter_dirs(ctx) == ["0-1"]
    assert _versions(ctx) == [(1, "active")]


def test_soft_time_limit_interrupts_the_engine_and_requeues(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Solo pool: Celery does not enforce the soft limit, the watchdog does. A round still in the
    engine after it is interrupted (asynchronous exception), fails retryably, its requests go back to
    the queue and nothing is published; the next attempt publishes once."""
    limited = _variant(
        ctx, worker_settings=WorkerSettings(device="cpu", soft_time_limit=1, hard_time_limit=600)
    )
    interrupted_after: list[float] = []

    def python_loop(_: rounds.ClaimedRound, __: RoundWatchdog) -> None:
        started = time.monotonic()
        try:
            while time.monotonic() - started < 15:
                time.sleep(0.01)
        finally:
            interrupted_after.append(time.monotonic() - started)

    monkeypatch.setattr(round_job, "_run_engine", _fake_engine(python_loop))
    request_id = _submit(ctx, "c0")
    result = pipeline.run_one_round(limited, MODEL)
    assert result is not None
    assert result.status == "failed"
    assert (result.error or "").startswith("SoftTimeLimitExceeded")
    assert interrupted_after[0] < 5
    assert _request_status(ctx, request_id) == "queued"
    assert _adapter_dirs(ctx) == ["0-1"]
    assert _versions(ctx) == [(1, "active")]
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    retried = pipeline.run_one_round(ctx, MODEL)
    assert retried is not None
    assert retried.status == "published"
    assert _versions(ctx) == [(1, "withdrawn"), (2, "active")]
    assert _evidence_rows(ctx, request_id) == 1


def test_soft_limit_outside_the_engine_never_interrupts_asynchronously(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The soft limit passes while the version is being sealed: no asynchronous exception lands
    there (it could land after the publish committed); the check before publishing fails the round
    and the sealed, unpublished directory is discarded."""
    finished: list[bool] = []

    def slow_sealing(event: str, _: dict[str, Any]) -> None:
        if event == "committed":
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # Python bytecode: an async exception would land
                time.sleep(0.01)
            finished.append(True)

    limited = _variant(
        ctx,
        worker_settings=WorkerSettings(device="cpu", soft_time_limit=1, hard_time_limit=600),
        hook=slow_sealing,
    )
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    request_id = _submit(ctx, "c0")
    result = pipeline.run_one_round(limited, MODEL)
    assert result is not None
    assert finished == [True]
    assert result.status == "failed"
    assert "round ran longer than 1 s" in (result.error or "")  # from check(), not asynchronous
    assert _request_status(ctx, request_id) == "queued"
    assert _adapter_dirs(ctx) == ["0-1"]
    assert _versions(ctx) == [(1, "active")]


def test_wake_runs_at_most_max_rounds(ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wake task runs one round per message (its duration stays under the visibility timeout)."""
    one_per_round = _variant(ctx, settings=ctx.settings.model_copy(update={"max_requests_per_round": 1}))
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    first, second = _submit(ctx, "c0"), _submit(ctx, "c1")
    results = pipeline.wake_model(one_per_round, MODEL, max_rounds=1)
    assert [r.status for r in results] == ["published"]
    assert (_request_status(ctx, first), _request_status(ctx, second)) == ("completed", "queued")
    assert [r.version for r in pipeline.wake_model(one_per_round, MODEL, max_rounds=1)] == [3]
    assert pipeline.wake_model(one_per_round, MODEL, max_rounds=1) == []


def test_preparation_runs_under_the_soft_time_limit(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preparation (dataset, base, v1) longer than the soft limit is interrupted; the model fails."""
    from worker.unlearning import engine

    def endless_prepare(*args: object, **kwargs: object) -> None:
        started = time.monotonic()
        while time.monotonic() - started < 15:
            time.sleep(0.01)

    monkeypatch.setattr(engine, "prepare", endless_prepare)
    with transaction(ctx.session_factory) as session:
        registry.register(
            session, "m2", workload="digits-clients", method="default", method_config={}, settings={}
        )
    limited = _variant(
        ctx, worker_settings=WorkerSettings(device="cpu", soft_time_limit=1, hard_time_limit=600)
    )
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        pipeline.prepare_model(limited, "m2")
    assert time.monotonic() - started < 8
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, "m2")
        assert model is not None
        assert model.status == "failed"
        assert "SoftTimeLimitExceeded" in (model.error or "")


def test_a_round_runs_with_the_method_and_settings_it_was_claimed_with(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9, item 13. ``method_config`` is the method's own settings block, merged over
    ``settings[method]`` (it was put under ``settings["method"]``, which no method reads); a model
    reconfigured while a round is held applies from the next round, also when the held round is
    resumed after its worker died (the model's settings were read afresh)."""
    from worker.unlearning import engine

    seen: list[tuple[str, dict[str, Any]]] = []

    def run_round(
        _workload: object, *, adapter_out: Path, requests: list[Any], method: str, settings: Any, **_: object
    ) -> Any:
        seen.append((method, settings))
        (adapter_out / "adapter_model.safetensors").write_bytes(f"v{len(seen)}".encode())
        (adapter_out / "adapter_config.json").write_text("{}")
        (adapter_out / STATE_FILE).write_text("{}")
        return dataclasses.make_dataclass("Outcome", ["evidence", "next_importance"])(
            {r.request_id: {} for r in requests}, None
        )

    monkeypatch.setattr(engine, "run_round", run_round)
    monkeypatch.setattr(worker_context, "_load_workload", lambda model: object())
    with transaction(ctx.session_factory) as session:
        registry.reconfigure(
            session,
            MODEL,
            method="ssd",
            method_config={"alpha": 2.0},
            settings={"ssd": {"alpha": 9.0, "lambda": 0.5}},
            actor="test",
        )
    _submit(ctx, "c0")
    with transaction(ctx.session_factory) as session:  # a worker that dies holding the round
        assert rounds.claim_round(session, MODEL, "w0", lease_seconds=60, max_requests=4, max_attempts=3)
    with transaction(ctx.session_factory) as session:
        registry.reconfigure(
            session, MODEL, method="default", method_config={}, settings={"ia": {"lr": 0.1}}, actor="test"
        )
    _expire_leases(ctx)
    resumed = pipeline.run_one_round(ctx, MODEL)
    assert resumed is not None
    assert resumed.status == "published"
    assert seen == [("ssd", {"ssd": {"alpha": 2.0, "lambda": 0.5}})]
    _submit(ctx, "c1")
    following = pipeline.run_one_round(ctx, MODEL)
    assert following is not None
    assert following.status == "published"
    assert seen[1] == ("default", {"ia": {"lr": 0.1}})


def _completed_task_requests(ctx: pipeline.WorkerContext, count: int) -> None:
    """``count`` completed per-task requests on sample s0, whose label of task t is purged."""
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        now = utcnow()
        for i in range(count):
            session.add(
                ForgetRequest(
                    id=requests_repo.new_request_id(), model_id=model.id, kind="task", sample_ids=["s0"],
                    tasks=["t"], subject_key=f"subject-{i}", status="completed", idempotency_key=f"k{i}",
                    payload_hash="0" * 64, received_at=now, due_at=now, updated_at=now, attempts=1,
                )
            )  # fmt: skip
        models_repo.mark_sample_tasks_purged(session, model.id, [("s0", "t")], all_tasks=model.tasks)


def _statements_of_pending_purges(ctx: pipeline.WorkerContext) -> tuple[int, int]:
    """(statements, pending requests) of one reconcile's look for pending purges."""
    assert ctx.engine is not None
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(ctx.engine, "before_cursor_execute", count)
    try:
        with transaction(ctx.session_factory) as session:
            model = models_repo.get_model(session, MODEL)
            assert model is not None
            statements.clear()
            pending = cleanup._pending_purges(session, model)
    finally:
        event.remove(ctx.engine, "before_cursor_execute", count)
    return len(statements), len(pending)


def test_looking_for_pending_purges_costs_the_same_however_long_the_history(
    ctx: pipeline.WorkerContext,
) -> None:
    """Issue 9 item 7 (failed on 5a93ed6: one statement per completed per-task request on every
    wake, 10,003 statements for 10,000 requests): a fixed number of statements, and requests whose
    purge is recorded are not read again."""
    _completed_task_requests(ctx, 5)
    few = _statements_of_pending_purges(ctx)
    _completed_task_requests(ctx, 200)
    many = _statements_of_pending_purges(ctx)
    assert few[1] == many[1] == 0
    assert many[0] == few[0] <= 5
    with transaction(ctx.session_factory) as session:
        assert requests_repo.unpurged_completed(session, 1) == []
    statements, _ = _statements_of_pending_purges(ctx)
    assert statements <= 2  # nothing left to check: the partial index answers


# --- progress (issue 10 part 3) -------------------------------------------------------------------


def test_the_api_shows_the_stage_of_a_running_round(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10 part 3 (defect: progress inside a round reached neither the database nor the API).
    The engine's stage reports reach ``GET /v1/forget-requests/{id}`` while the round runs: the first
    at once, the last one held back by the throttle when the engine returns; ``publish`` while it
    verifies; nothing once it completed."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.repositories import keys as keys_repo
    from worker.unlearning import engine

    with transaction(ctx.session_factory) as session:
        _, secret = keys_repo.create_key(session, ["admin"], name="progress")
    first, second = _submit(ctx, "c0"), _submit(ctx, "c1")
    seen: dict[str, Any] = {}

    with TestClient(create_app(ctx.settings), headers={"Authorization": f"Bearer {secret}"}) as api:

        def progress_of(request_id: str) -> tuple[str, Any]:
            body = api.get(f"/v1/forget-requests/{request_id}").json()
            return body["status"], body["progress"]

        def run_round(
            _workload: object,
            *,
            adapter_out: Path,
            requests: list[Any],
            on_stage: Callable[[str, int, int], None],
            **_: object,
        ) -> Any:
            on_stage("partitions", 1, 2)
            seen["partitions"] = progress_of(second)
            for epoch in range(1, 11):  # faster than the throttle: the last must still be written
                on_stage("update", epoch, 10)
            (adapter_out / "adapter_model.safetensors").write_bytes(b"v2")
            (adapter_out / "adapter_config.json").write_text("{}")
            (adapter_out / STATE_FILE).write_text("{}")
            return dataclasses.make_dataclass("Outcome", ["evidence", "next_importance"])(
                {r.request_id: {} for r in requests}, None
            )

        def hook(event_name: str, _details: dict[str, Any]) -> None:
            if event_name in ("engine_done", "committed"):
                seen[event_name] = progress_of(first)

        monkeypatch.setattr(engine, "run_round", run_round)
        monkeypatch.setattr(worker_context, "_load_workload", lambda model: object())
        result = pipeline.run_one_round(_variant(ctx, hook=hook), MODEL)
        assert result is not None
        assert result.status == "published"
        status, progress = seen["partitions"]
        assert status == "running"
        assert progress["round_id"] == result.round_id
        assert (progress["stage"], progress["step"], progress["of"]) == ("partitions", 1, 2)
        status, progress = seen["engine_done"]
        assert (status, progress["stage"], progress["step"], progress["of"]) == ("running", "update", 10, 10)
        status, progress = seen["committed"]
        assert (status, progress["stage"]) == ("verifying", "publish")
        assert progress_of(first) == ("completed", None)


def _toy_with_references(
    ctx: pipeline.WorkerContext,
    monkeypatch: pytest.MonkeyPatch,
    members: dict[int, list[str]],
    *,
    task_request_of: str,
) -> tuple[Path, Any]:
    """The toy model with a fake engine, a set of K = 4 references listing ``members`` (the others
    dropped; placeholder weights), and a queued per-task request on two of ``task_request_of``'s
    samples. The refresh trains real references: the toy workload (registered as digits here) and
    its base."""
    import worker.unlearning.workload as workload_module
    from worker.unlearning.engine import ensure_base
    from worker.unlearning.reference_adapters import REFERENCES_FILE, ReferenceSet
    from worker.unlearning.workloads.toy import ToyWorkload

    subjects = _toy_model(ctx)
    monkeypatch.setattr(workload_module, "build_workload", lambda *args, **kwargs: ToyWorkload())
    ensure_base(ToyWorkload(), ctx.artifacts("toy").base_dir, {}, 0)
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine())
    refs_dir = ctx.references_dir("toy")
    refs = ReferenceSet(clients=["u0", "u1", "u2"], members=members, k=4, seed=0, workload="toy",
                        recipe={}, recipe_digest="d", train_s=0.0)  # fmt: skip
    for i in refs.members:
        (refs_dir / f"ref-{i}").mkdir(parents=True)
        (refs_dir / f"ref-{i}" / "adapter_model.safetensors").write_bytes(b"weights")
    (refs_dir / REFERENCES_FILE).write_text(json.dumps(refs.to_json()))
    with transaction(ctx.session_factory) as session:
        lifecycle.submit(
            session,
            lifecycle.Submission(model="toy", kind="task", sample_ids=subjects[task_request_of][:2],
                                 tasks=["side"]),
            idempotency_key="k1", api_key_id=None, actor="t",
        )  # fmt: skip
    return refs_dir, refs


def test_a_purge_drops_the_reference_adapters_trained_on_the_erased_data(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 8 part 5: a likelihood-ratio reference adapter trained on a client keeps its data, so
    the purge of a request deletes every reference whose half held a client it touched (here a
    per-task request on two of u1's samples: found through the samples' owner) and keeps the others;
    ``references.json`` lists only what is left. Then (issue 8 part 1) the dropped ones are retrained
    on their half (``assign_halves`` of the set's clients, K and seed) from the purged store, and the
    others are left as they were."""
    from worker.unlearning.reference_adapters import assign_halves, read_references

    halves = {0: ["u0", "u1"], 1: ["u2"], 2: ["u1"], 3: ["u0"]}
    refs_dir, refs = _toy_with_references(ctx, monkeypatch, halves, task_request_of="u1")
    after_drop: list[tuple[list[int], list[str]]] = []
    real_refresh = cleanup.refresh_references

    def spy(*args: Any, **kwargs: Any) -> list[int]:  # what the drop left, before the refresh
        left = read_references(refs_dir)
        assert left is not None
        after_drop.append((sorted(left.members), sorted(p.name for p in refs_dir.iterdir() if p.is_dir())))
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(cleanup, "refresh_references", spy)
    result = pipeline.run_one_round(ctx, "toy")
    assert result is not None
    assert result.status == "published"
    assert after_drop == [([1, 3], ["ref-1", "ref-3"])]
    refreshed = read_references(refs_dir)
    assert refreshed is not None
    halves_now = assign_halves(refs.clients, 4, 0)
    assert refreshed.members == {0: halves_now[0], 1: ["u2"], 2: halves_now[2], 3: ["u0"]}
    for i in (1, 3):
        assert (refs_dir / f"ref-{i}" / "adapter_model.safetensors").read_bytes() == b"weights"
    for i in (0, 2):
        assert (refs_dir / f"ref-{i}" / "adapter_config.json").is_file()


def test_the_reference_refresh_waits_while_a_request_is_queued_and_runs_when_the_model_is_idle(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference retrain is about half an adapter retrain (about 30 s on scenes): the next request
    must not wait behind it. With a request queued the refresh trains nothing (the dropped
    references stay dropped; the round that serves the request uses those left); the cleanup after
    that round, with the queue empty, retrains them. (Would fail if the refresh ignored the queue,
    or if after_publish no longer refreshed.)"""
    from worker.unlearning.reference_adapters import read_references

    refs_dir, _ = _toy_with_references(ctx, monkeypatch, {1: ["u2"], 3: ["u0"]}, task_request_of="u0")
    assert cleanup.refresh_dropped_references(ctx, "toy") == []
    waited = read_references(refs_dir)
    assert waited is not None
    assert sorted(waited.members) == [1, 3]
    result = pipeline.run_one_round(ctx, "toy")  # its purge drops ref 3 (u0); its cleanup finds no queue
    assert result is not None
    assert result.status == "published"
    refreshed = read_references(refs_dir)
    assert refreshed is not None
    assert sorted(refreshed.members) == [0, 1, 2, 3]
    assert (refs_dir / "ref-1" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert all((refs_dir / f"ref-{i}" / "adapter_config.json").is_file() for i in (0, 2, 3))
