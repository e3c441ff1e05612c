"""Backup and restore: a worker that deletes nothing while the database and the artifacts disagree,
and ``lethe models reapply-erasures`` after a restore.

Covers issue 9, item 8: restoring an older database made ``latest`` point at deleted files and the
worker's orphan GC removed the only intact adapter; nothing re-applied erasures after a restore, so
a data-store backup brought purged personal data back.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from service import registry, rounds
from service.db.migrate import upgrade
from service.db.models import AdapterVersion
from service.db.session import transaction
from service.repositories import models as models_repo
from service.repositories import requests as requests_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from tests.worker.requests import submit_client
from worker import consistency, pipeline, round_job
from worker.artifacts import verify_directory
from worker.cli import models_command
from worker.config import WorkerSettings
from worker.unlearning.state import STATE_FILE

MODEL = "m1"


def _context(settings: Settings) -> pipeline.WorkerContext:
    return pipeline.WorkerContext.create(
        settings, WorkerSettings(device="cpu", torch_threads=0), worker_id="w1"
    )


def _register(ctx: pipeline.WorkerContext, subjects: dict[str, list[str]], tasks: list[str]) -> None:
    store = ctx.artifacts(MODEL)
    staging = store.staging_dir("0-1")
    (staging / "adapter_model.safetensors").write_bytes(b"v1")
    v1 = store.commit(staging, "0-1", parent_version=None, requests=[], evidence={}, extra={"version": 1})
    with transaction(ctx.session_factory) as session:
        registry.register(
            session, MODEL, workload="digits-clients", method="default", method_config={}, settings={}
        )
        rounds.register_prepared_model(
            session,
            MODEL,
            subjects=subjects,
            location=v1.location,
            files={k: rounds.FileDigest(v.sha256, v.size) for k, v in v1.files.items()},
            evidence={},
            tasks=tasks,
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", database_url=None)
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def ctx(settings: Settings) -> Iterator[pipeline.WorkerContext]:
    context = _context(settings)
    _register(context, {"c0": ["s0", "s1"], "c1": ["s2", "s3"]}, ["t"])
    yield context
    context.close()


def _fake_engine(
    _ctx: object, claimed: rounds.ClaimedRound, *, staging: Path, **_: object
) -> round_job.EngineResult:
    (staging / "adapter_model.safetensors").write_bytes(f"round {claimed.round_id}".encode())
    (staging / STATE_FILE).write_text("{}")  # sealing keeps the state worker-side; it must exist
    return round_job.EngineResult({r.id: {"fake": True} for r in claimed.requests}, None)


def _submit(ctx: pipeline.WorkerContext, client: str) -> str:
    return submit_client(ctx, MODEL, client)


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (the backup API, as ``sqlite3 .backup`` does)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def _restore_database(backup: Path, settings: Settings) -> None:
    db = settings.resolved_home / "lethe.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _copy_database(backup, db)


def _model_halt(ctx: pipeline.WorkerContext) -> str | None:
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        return model.halted_reason


def test_an_older_database_halts_the_model_and_the_newest_adapter_survives(
    ctx: pipeline.WorkerContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the restored database still had v1 as latest and c0 queued; the worker collected
    v2's directory as an orphan (the only intact adapter) and ran the round again."""
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine)
    request_id = _submit(ctx, "c0")
    db = settings.resolved_home / "lethe.db"
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    _copy_database(db, old)  # the backup: c0 queued, v1 latest
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    store = ctx.artifacts(MODEL)
    v2 = store.adapters_dir / f"{result.round_id}-{result.fencing_token}"
    assert not (store.adapters_dir / "0-1").exists()  # v1 withdrawn and deleted
    _copy_database(db, new)
    ctx.close()

    _restore_database(old, settings)
    restored = _context(settings)
    try:
        with caplog.at_level(logging.ERROR, logger="worker"):
            assert pipeline.wake_model(restored, MODEL) == []
        verify_directory(v2)  # kept, intact
        reason = _model_halt(restored)
        assert reason is not None
        assert "active version 1 has no files" in reason
        assert f"adapters/{v2.name} is a sealed version the database does not know" in reason
        assert any("HALTED" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        with transaction(restored.session_factory) as session:
            request = requests_repo.get_request(session, request_id)
            assert request is not None
            assert request.status == "queued"  # no round ran
    finally:
        restored.close()

    _restore_database(new, settings)  # the matching database: they agree again, the model resumes
    fixed = _context(settings)
    try:
        assert pipeline.wake_model(fixed, MODEL) == []
        assert _model_halt(fixed) is None
        verify_directory(v2)
    finally:
        fixed.close()


def test_gc_spares_foreign_sealed_versions_and_collects_own_crashed_attempts(
    ctx: pipeline.WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ctx.artifacts(MODEL)
    crashed = store.staging_dir("1-1")
    (crashed / "adapter_model.safetensors").write_bytes(b"sealed, then the worker died")
    _submit(ctx, "c0")
    claimed = pipeline.claim(ctx, MODEL)
    assert claimed is not None
    mine = store.commit(
        crashed, "1-1", parent_version=1, requests=[], evidence={},
        extra={"round_id": claimed.round_id, "fencing_token": claimed.fencing_token},
    )  # fmt: skip
    foreign_staging = store.staging_dir("7-9")
    (foreign_staging / "adapter_model.safetensors").write_bytes(b"from a newer database")
    foreign = store.commit(
        foreign_staging, "7-9", parent_version=3, requests=[], evidence={},
        extra={"round_id": 7, "fencing_token": 9},
    )  # fmt: skip
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        view = consistency.DatabaseView.load(session, model)
    assert not consistency.is_foreign(mine.path, view)
    assert consistency.is_foreign(foreign.path, view)
    removed = store.gc_orphans(view.locations, spare=lambda d: consistency.is_foreign(d, view))
    assert removed == [mine.path]
    assert foreign.path.is_dir()


@pytest.fixture
def digits_ctx(settings: Settings) -> Iterator[pipeline.WorkerContext]:
    """A model over a real data store (the digits workload)."""
    from worker.unlearning.datastore import DataStore
    from worker.unlearning.workloads.digits import DigitsClients

    context = _context(settings)
    store = DataStore.materialise(context.data_dir(MODEL), DigitsClients())
    _register(context, {c: store.sample_ids_of(c) for c in store.clients}, store.tasks)
    yield context
    context.close()


def test_reapply_erasures_after_restoring_an_older_data_store_and_artifacts(
    digits_ctx: pipeline.WorkerContext, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: nothing re-applied erasures; the restored data store kept c0's purged samples."""
    from worker.unlearning.datastore import DataStore

    ctx = digits_ctx
    data_dir = ctx.data_dir(MODEL)
    store = ctx.artifacts(MODEL)
    shutil.copytree(data_dir, tmp_path / "data-backup")
    shutil.copytree(store.adapters_dir / "0-1", tmp_path / "v1-backup")
    monkeypatch.setattr(round_job, "_run_engine", _fake_engine)
    _submit(ctx, "c0")
    result = pipeline.run_one_round(ctx, MODEL)
    assert result is not None
    assert result.status == "published"
    assert DataStore(data_dir).client_samples("c0") is None

    # restore the older data store and v1's files; a hand-restored database row marks v1 active again
    shutil.rmtree(data_dir)
    shutil.copytree(tmp_path / "data-backup", data_dir)
    shutil.copytree(tmp_path / "v1-backup", store.adapters_dir / "0-1")
    with transaction(ctx.session_factory) as session:
        session.execute(update(AdapterVersion).where(AdapterVersion.version == 1).values(status="active"))
    assert DataStore(data_dir).client_samples("c0") is not None

    monkeypatch.setenv("LETHE_HOME", str(settings.resolved_home))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    ran = CliRunner().invoke(models_command, ["reapply-erasures"])
    assert ran.exit_code == 0, ran.output
    assert "withdrew [1], deleted files of [1], purged the data of 1 completed request(s)" in ran.output
    assert DataStore(data_dir).client_samples("c0") is None
    assert "c0" in DataStore(data_dir).purged_clients
    assert not (store.adapters_dir / "0-1").exists()
    assert store.tombstone_path(1).is_file()
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, MODEL)
        assert model is not None
        assert [(v.version, v.status) for v in versions_repo.list_versions(session, model.id)] == [
            (1, "withdrawn"),
            (2, "active"),
        ]
        assert model.halted_reason is None


def test_reapply_erasures_reports_and_quarantines_what_it_cannot_match(
    ctx: pipeline.WorkerContext, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ctx.artifacts(MODEL)
    staging = store.staging_dir("7-9")
    (staging / "adapter_model.safetensors").write_bytes(b"from a newer database")
    foreign = store.commit(
        staging, "7-9", parent_version=3, requests=[], evidence={}, extra={"round_id": 7, "fencing_token": 9}
    )
    monkeypatch.setenv("LETHE_HOME", str(settings.resolved_home))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    runner = CliRunner()
    reported = runner.invoke(models_command, ["reapply-erasures", MODEL])
    assert reported.exit_code == 1
    assert "DISAGREES: adapters/7-9 is a sealed version the database does not know" in reported.output
    assert foreign.path.is_dir()
    assert _model_halt(ctx) is not None

    moved = runner.invoke(models_command, ["reapply-erasures", MODEL, "--quarantine-unknown"])
    assert moved.exit_code == 0, moved.output
    assert (store.model_dir / "quarantine" / "7-9" / "manifest.json").is_file()
    assert _model_halt(ctx) is None
    assert runner.invoke(models_command, ["reapply-erasures", "nope"]).exit_code == 1
