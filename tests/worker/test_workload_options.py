"""A registered model's workload options reach the workload (issue 7 part 5): ``lethe models create
--workload-option`` stores them, the worker's preparation builds the workload with them, and an
option the constructor refuses fails the preparation with a clear error, nothing half-created."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.db.migrate import upgrade
from service.db.session import transaction
from service.repositories import models as models_repo
from service.repositories import versions as versions_repo
from service.settings import Settings
from tests.worker.unlearning.toy_entry_point import register_toy
from worker import cli, pipeline
from worker import context as worker_context
from worker import models as models_ops
from worker.config import WorkerSettings
from worker.unlearning.workload import WorkloadOptionsError


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    register_toy(monkeypatch)
    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LETHE_DATABASE_URL", raising=False)
    settings = Settings()
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def ctx(settings: Settings) -> Iterator[pipeline.WorkerContext]:
    context = pipeline.WorkerContext.create(settings, WorkerSettings(device="cpu"), worker_id="w1")
    yield context
    context.close()


def test_models_create_cli_stores_and_lists_workload_options(settings: Settings) -> None:
    """Defect: ``lethe models create`` had no way to pass workload options. Values are JSON (a
    quoted string stays a string); options the workload's constructor refuses are refused before
    the model is registered (a fresh-user pass: the model was left ``failed``)."""
    runner = CliRunner()
    created = runner.invoke(
        cli.models_command,
        ["create", "m-toy", "--workload", "toy", "--prepare", "none",
         "--workload-option", "num_clients=4", "--workload-option", "per_client=6"],
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    assert 'model m-toy registered (workload toy {"num_clients": 4, "per_client": 6})' in created.output
    listed = runner.invoke(cli.models_command, ["list", "--json"])
    assert json.loads(listed.output)[0]["workload_options"] == {"num_clients": 4, "per_client": 6}
    unknown = runner.invoke(
        cli.models_command,
        ["create", "m-note", "--workload", "toy", "--prepare", "none", "--workload-option", 'note="a b"'],
    )
    assert unknown.exit_code == 2, unknown.output
    assert '"note": "a b"' in unknown.output  # parsed as a JSON string, then refused by the workload
    assert [m["name"] for m in json.loads(runner.invoke(cli.models_command, ["list", "--json"]).output)] == [
        "m-toy"
    ]
    bad = runner.invoke(
        cli.models_command, ["create", "m-two", "--prepare", "none", "--workload-option", "no-equals"]
    )
    assert bad.exit_code == 2
    assert "KEY=VALUE" in bad.output


def test_preparation_builds_the_workload_from_the_models_options(ctx: pipeline.WorkerContext) -> None:
    """Defect: the worker built every workload with its defaults; the model's options are passed to
    the workload's constructor (here: 4 toy clients instead of 3)."""
    models_ops.create_model(
        "m-toy", workload="toy", workload_options={"num_clients": 4, "seed": 5}, app_settings=ctx.settings
    )
    published = pipeline.prepare_model(ctx, "m-toy", time_limits=False)
    assert published is not None
    assert published.version == 1
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, "m-toy")
        assert model is not None
        assert (model.status, model.workload_options) == ("ready", {"num_clients": 4, "seed": 5})
        assert models_repo.count_subjects(session, model.id) == (4, 0)
        workload = worker_context._load_workload(model)
    assert (workload.clients(), getattr(workload, "seed", None)) == (["u0", "u1", "u2", "u3"], 5)


def test_a_refused_option_fails_the_preparation_with_a_clear_error(ctx: pipeline.WorkerContext) -> None:
    """An option the constructor does not take: the model is ``failed`` with an error naming the
    workload and the option; no data, base or version was made."""
    models_ops.create_model(
        "m-bad", workload="toy", workload_options={"num_clientz": 4}, app_settings=ctx.settings
    )
    with pytest.raises(WorkloadOptionsError):
        pipeline.prepare_model(ctx, "m-bad", time_limits=False)
    with transaction(ctx.session_factory) as session:
        model = models_repo.get_model(session, "m-bad")
        assert model is not None
        assert model.status == "failed"
        error = model.error or ""
        assert "workload 'toy' refused the options" in error, error
        assert "num_clientz" in error, error
        assert versions_repo.list_versions(session, model.id) == []
        assert models_repo.count_subjects(session, model.id) == (0, 0)
    store = ctx.artifacts("m-bad")
    assert not ctx.data_dir("m-bad").exists()
    assert not store.base_dir.exists()
    assert not store.adapters_dir.exists()
