"""The round pipeline against a real (SQLite) database with a stand-in engine: fencing and cleanup.

No torch here: ``pipeline._run_engine`` is replaced by a function that writes adapter files, so
these tests exercise claim → seal → publish → withdraw and the lease-takeover path quickly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from service import lifecycle, registry, rounds
from service.db.migrate import upgrade
from service.db.models import Round
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from worker import pipeline
from worker.artifacts import ModelArtifacts, verify_directory
from worker.config import WorkerSettings

MODEL = "m1"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[pipeline.WorkerContext]:
    settings = Settings(home=tmp_path / "home", database_url=None)
    upgrade(settings.resolved_database_url)
    context = pipeline.WorkerContext.create(settings, WorkerSettings(device="cpu"), worker_id="w1")
    store = ModelArtifacts(settings.resolved_artifacts_dir, MODEL)
    staging = store.staging_dir("0-1")
    (staging / "adapter_model.safetensors").write_bytes(b"v1")
    v1 = store.commit(staging, "0-1", parent_version=None, requests=[], evidence={})
    with transaction(context.session_factory) as session:
        registry.register(
            session, MODEL, workload="digits-clients", method="default", method_config={}, settings={}
        )
        rounds.register_prepared_model(
            session,
            MODEL,
            subjects={"c0": ["s0", "s1"], "c1": ["s2", "s3"]},
            location=v1.location,
            files={k: rounds.FileDigest(v.sha256, v.size) for k, v in v1.files.items()},
            evidence={},
            tasks=["t"],
        )
    yield context
    context.close()


def _submit(ctx: pipeline.WorkerContext, client: str) -> str:
    with transaction(ctx.session_factory) as session:
        result = lifecycle.submit(
            session,
            lifecycle.Submission(model=MODEL, kind="client", client_id=client),
            idempotency_key=f"k-{client}",
            api_key_id=None,
            actor="test",
            due_days=30,
        )
        return result.request.id


def _fake_engine(
    before_return: Callable[[rounds.ClaimedRound], None] | None = None,
) -> Callable[..., dict[str, dict[str, Any]]]:
    def run(
        ctx: pipeline.WorkerContext,
        claimed: rounds.ClaimedRound,
        model: Any,
        workload_settings: dict[str, Any],
        staging: Path,
        watchdog: Any,
    ) -> dict[str, dict[str, Any]]:
        (staging / "adapter_model.safetensors").write_bytes(f"round {claimed.round_id}".encode())
        (staging / "adapter_config.json").write_text("{}")
        if before_return is not None:
            before_return(claimed)
        return {r.id: {"fake": True} for r in claimed.requests}

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
    monkeypatch.setattr(pipeline, "_run_engine", _fake_engine())
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

    def take_over(claimed: rounds.ClaimedRound) -> None:
        _expire_leases(ctx)
        resumed = pipeline.claim(ctx2, MODEL)
        assert resumed is not None
        assert resumed.round_id == claimed.round_id
        assert resumed.fencing_token > claimed.fencing_token
        taken.append(resumed)

    monkeypatch.setattr(pipeline, "_run_engine", _fake_engine(take_over))
    _submit(ctx, "c1")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "lease_lost"
    assert result.version is None
    store = ctx.artifacts(MODEL)
    leftovers = [p.name for p in store.adapters_dir.iterdir() if p.name != "0-1"]
    assert leftovers == []  # the fenced-off attempt discarded its directories
    # worker 2's claim is live; let it lapse, and a fresh run by worker 2 resumes and publishes
    monkeypatch.setattr(pipeline, "_run_engine", _fake_engine())
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
    monkeypatch.setattr(pipeline, "_run_engine", _fake_engine())
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert not orphan.exists()
    assert not staging.exists()


def test_engine_error_requeues_then_fails_at_the_attempt_cap(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> dict[str, dict[str, Any]]:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(pipeline, "_run_engine", boom)
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
