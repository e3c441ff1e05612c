"""The certification task body called directly (issue 8 part 5), on the toy workload and a real
(SQLite) database: a sampled round keeps a snapshot of its forget set before the purge; the task
retrains the reference, records the verdict, appends evidence and a chained event per request, and
deletes the snapshot; on demand after the purge the forget-set terms are reported unavailable."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from service import certification as certification_service
from service.db.migrate import upgrade
from service.db.models import Certification, Evidence
from service.db.session import transaction
from service.db.types import utcnow
from service.repositories import certifications as certifications_repo
from service.repositories import events as events_repo
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from tests.worker.requests import submit_client
from worker import certification, pipeline
from worker import context as worker_context
from worker.config import WorkerSettings
from worker.unlearning.workload import Workload
from worker.unlearning.workloads.toy import ToyWorkload

MODEL = "toy"


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pipeline.WorkerContext]:
    def toy(_: object) -> Workload:
        return ToyWorkload()

    monkeypatch.setattr(worker_context, "_load_workload", toy)  # the toy workload is no entry point
    settings = Settings(home=tmp_path / "home", database_url=None, certify_share=1.0)
    upgrade(settings.resolved_database_url)
    context = pipeline.WorkerContext.create(settings, WorkerSettings(device="cpu"), worker_id="w1")
    with transaction(context.session_factory) as session:
        models_repo.create_model(
            session, MODEL, workload="toy", method="original", method_config={},
            settings={"certify": {"tolerance": 1.0}},
        )  # fmt: skip
    assert pipeline.prepare_model(context, MODEL, time_limits=False) is not None
    yield context
    context.close()


def _forget(ctx: pipeline.WorkerContext, client: str) -> str:
    return submit_client(ctx, MODEL, client)


def _events(ctx: pipeline.WorkerContext, request_id: str) -> list[str]:
    with transaction(ctx.session_factory) as session:
        return [e.type for e in events_repo.events_for_request(session, request_id)]


def test_sampled_round_is_certified_from_its_snapshot_then_on_demand_without_one(
    ctx: pipeline.WorkerContext,
) -> None:
    request_id = _forget(ctx, "u1")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    snap = certification.snapshot_dir(ctx, MODEL, result.round_id)
    assert (snap / "snapshot.json").exists()  # kept before the purge ...
    assert not (ctx.data_dir(MODEL) / "clients" / "u1.npz").exists()  # ... which then happened
    waiting = certification.requested(ctx, model_name=MODEL)
    assert len(waiting) == 1

    assert certification.run_certification(ctx, waiting[0]) == "certified"  # tolerance 1.0
    assert certification.run_certification(ctx, waiting[0]) is None  # a duplicate message: no-op
    assert not snap.exists()  # deleted once certification is done
    with transaction(ctx.session_factory) as session:
        row = session.get(Certification, waiting[0])
        assert row is not None
        assert (row.status, row.trigger, row.attempts) == ("certified", "sampled", 1)
        assert row.result is not None
        assert row.result["verdict"] == "within_bounds"
        payloads = [
            e.payload for e in session.scalars(select(Evidence).where(Evidence.request_id == request_id))
        ]
        assert events_repo.verify_chain(session).ok
    assert [p["kind"] for p in payloads] == ["client", "certification"]  # appended to its evidence
    cert = payloads[1]
    assert cert["verdict"] == "within_bounds"
    assert cert["within_bounds"] is True
    assert cert["overall"] == "within_bounds"
    assert cert["forget_set"] == "snapshot"
    assert cert["uis"]["value"] is not None
    assert cert["retain_set"]["exact"] is True
    assert _events(ctx, request_id)[-1] == "certified"

    # on demand, after the purge and without a snapshot: what it can, and why not the rest
    with transaction(ctx.session_factory) as session:
        row, created = certification_service.request_certification(session, MODEL, 2, actor="admin")
        on_demand = row.id
    assert created
    assert certification.run_certification(ctx, on_demand) == "incomplete"
    with transaction(ctx.session_factory) as session:
        last = session.scalars(
            select(Evidence).where(Evidence.request_id == request_id).order_by(Evidence.id.desc())
        ).first()
        assert last is not None
        assert last.payload["forget_set"] == "unavailable"
        assert last.payload["within_bounds"] is None
        assert "unavailable" in last.payload["uis"]["reason"]
    assert _events(ctx, request_id)[-1] == "certification_incomplete"


def test_a_failed_certification_is_recorded_and_its_snapshot_kept(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forget(ctx, "u2")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    (cid,) = certification.requested(ctx, model_name=MODEL)

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("no GPU left")

    monkeypatch.setattr("worker.unlearning.certify.certify_version", boom)
    assert certification.run_certification(ctx, cid) == "failed"
    with transaction(ctx.session_factory) as session:
        row = session.get(Certification, cid)
        assert row is not None
        assert row.status == "failed"
        assert row.error == "RuntimeError: no GPU left"
    assert (certification.snapshot_dir(ctx, MODEL, result.round_id) / "snapshot.json").exists()
    # asked again; its worker dies while running: after the hard limit it is requested again
    with transaction(ctx.session_factory) as session:
        row, created = certification_service.request_certification(session, MODEL, 2, actor="admin")
        again = row.id
        assert created
        hours_ago = utcnow() - timedelta(seconds=ctx.worker_settings.hard_time_limit + 60)
        assert certifications_repo.start(session, again, at=hours_ago)
    assert certification.requested(ctx) == []
    assert certification.requeue_stale(ctx) == [again]
    assert certification.requested(ctx) == [again]


def test_sampled_certification_survives_the_next_round_withdrawing_its_version(
    ctx: pipeline.WorkerContext,
) -> None:
    """The next round withdraws v2 and deletes its files before v2's certification runs (one worker
    takes both queues in any order): the snapshot's copy of the adapter is certified, and the
    result says the retrain learned from less than v2's retain set (u2 was purged since)."""
    _forget(ctx, "u1")
    first = pipeline.run_one_round(ctx, MODEL)
    assert first is not None
    (cid,) = certification.requested(ctx, model_name=MODEL)
    _forget(ctx, "u2")
    second = pipeline.run_one_round(ctx, MODEL)
    assert second is not None
    assert second.withdrawn == [2]
    with transaction(ctx.session_factory) as session:
        found = models_repo.get_model(session, MODEL)
        assert found is not None
        v2 = versions_repo.get_version(session, found.id, 2)
        assert v2 is not None
        location = v2.location
    assert not (ctx.artifacts(MODEL).resolve(location) / "adapter_model.safetensors").exists()
    assert certification.run_certification(ctx, cid) == "certified"
    with transaction(ctx.session_factory) as session:
        row = session.get(Certification, cid)
        assert row is not None
        assert row.result is not None
        assert row.result["version"] == 2
        assert row.result["retain_set"]["exact"] is False
        assert row.result["retain_set"]["purged_beyond_version"]["clients"] == 1
    assert not certification.snapshot_dir(ctx, MODEL, first.round_id).exists()


def test_rounds_are_sampled_deterministically() -> None:
    assert not certification.sampled("m", 1, 0.0)
    assert certification.sampled("m", 1, 1.0)
    draws = [certification.sampled("m", r, 0.3) for r in range(400)]
    assert draws == [certification.sampled("m", r, 0.3) for r in range(400)]
    assert 0.2 < sum(draws) / 400 < 0.4
