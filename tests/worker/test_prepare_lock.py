"""A preparation running on one machine is not sent again by another machine's sweeper (issue 10,
several machines with an object store). Failed before: the prepare lock lived in the artifacts
directory, which is each machine's own with ``LETHE_ARTIFACT_STORE=s3``, so a second machine saw it
free, re-sent ``lethe.prepare_model`` a minute after registration, and its worker deleted and
rebuilt the shared dataset store under the running preparation."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import registry
from service.db.migrate import upgrade
from service.db.session import transaction
from service.settings import Settings
from worker import context, liveness, preparation
from worker.config import WorkerSettings
from worker.context import WorkerContext


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[tuple[WorkerContext, WorkerContext]]:
    """Two worker machines: their own home and artifacts, one database and one shared data volume."""
    db = f"sqlite:///{tmp_path / 'lethe.db'}"
    upgrade(db)
    shared = tmp_path / "shared-data"
    bucket = f"unused-{uuid.uuid4().hex[:8]}"  # never reached: these tests fetch nothing
    contexts = tuple(
        WorkerContext.create(
            Settings(
                home=tmp_path / name, database_url=db, data_dir=shared, artifact_store="s3", s3_bucket=bucket
            ),
            WorkerSettings(device="cpu"),
            worker_id=name,
        )
        for name in ("a", "b")
    )
    with transaction(contexts[0].session_factory) as session:
        registry.register(
            session, "m1", workload="digits-clients", method=None, method_config={}, settings={}
        )
    yield contexts[0], contexts[1]
    for ctx in contexts:
        ctx.close()


def test_a_preparation_on_another_machine_is_not_sent_again(
    machines: tuple[WorkerContext, WorkerContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = machines
    assert a.artifacts_root != b.artifacts_root
    assert liveness.models_to_prepare(b, min_age_seconds=0) == ["m1"]  # nobody prepares it: re-send
    started, release = threading.Event(), threading.Event()

    def training(*_: object, **__: object) -> None:  # the engine's preparation, held open
        started.set()
        assert release.wait(30)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(context, "_load_workload", lambda model: None)
    monkeypatch.setattr("worker.unlearning.engine.prepare", training)
    errors: list[BaseException] = []

    def prepare_on_a() -> None:
        try:
            preparation.prepare_model(a, "m1", time_limits=False)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=prepare_on_a)
    thread.start()
    try:
        assert started.wait(30)
        assert liveness.models_to_prepare(b, min_age_seconds=0) == []  # machine b sees a's lock
        assert liveness.models_to_prepare(a, min_age_seconds=0) == []
    finally:
        release.set()
        thread.join(30)
    assert [str(e) for e in errors] == ["stopped by the test"]
