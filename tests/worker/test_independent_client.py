"""Issue 7 part 3: a serving host without Lethe reproduces the worker's outputs bit for bit.

A small scenes model (the transformer workload, committed base) is prepared by the worker code; a
per-client and a per-task request are posted over the real API app (HTTP through the ASGI
transport), a real worker round publishes v2; ``tests/worker/independent_client.py`` (transformers /
torch / peft / httpx / safetensors only) pulls the base and the latest adapter over the API and its
outputs equal the worker's (``torch.equal``) on every head.
"""

from __future__ import annotations

import ast
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.migrate import upgrade
from service.db.session import transaction
from service.repositories import keys as keys_repo
from service.repositories import models as models_repo
from service.settings import Settings
from tests.worker import independent_client
from tests.worker.unlearning.workloads.test_scenes_workload import SETTINGS, SMALL
from worker import context as worker_context
from worker import pipeline
from worker.artifacts import version_dir_name
from worker.config import WorkerSettings
from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.workload import Workload
from worker.unlearning.workloads.scenes.workload import ScenesWorkload

MODEL = "scenes"
ALLOWED_IMPORTS = {"transformers", "torch", "peft", "httpx", "safetensors"}


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pipeline.WorkerContext]:
    def small(_: object) -> Workload:
        return ScenesWorkload(**SMALL)

    # a small scenes model (the registered workload has the real size; per-model options come later)
    monkeypatch.setattr(worker_context, "_load_workload", small)
    torch.set_num_threads(1)
    settings = Settings(home=tmp_path / "home", database_url=None)
    upgrade(settings.resolved_database_url)
    context = pipeline.WorkerContext.create(settings, WorkerSettings(device="cpu"), worker_id="w1")
    with transaction(context.session_factory) as session:
        models_repo.create_model(
            session, MODEL, workload="scenes", method="default", method_config={}, settings=SETTINGS
        )
    assert pipeline.prepare_model(context, MODEL, time_limits=False) is not None
    yield context
    context.close()


def test_the_client_imports_only_serving_libraries() -> None:
    """The independent client must not use Lethe: every import is a serving library or stdlib."""
    tree = ast.parse(Path(independent_client.__file__).read_text())
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(str(node.module).split(".")[0])
    assert not roots & {"service", "worker", "tests"}
    assert roots - ALLOWED_IMPORTS <= set(sys.stdlib_module_names), roots - ALLOWED_IMPORTS


def test_pulled_base_and_adapter_reproduce_the_workers_outputs(
    ctx: pipeline.WorkerContext, tmp_path: Path
) -> None:
    workload = ScenesWorkload(**SMALL)
    with transaction(ctx.session_factory) as session:
        _, secret = keys_repo.create_key(session, ["submit", "serve"])
    auth = {"Authorization": f"Bearer {secret}"}
    data = workload.client_data()
    task_samples = [s for s, c in zip(data.sample_ids, data.client_ids, strict=True) if c == "c02"][:5]
    with TestClient(create_app(ctx.settings), headers=auth) as api:
        ids = []
        for body in (
            {"model": MODEL, "kind": "client", "client_id": "c01"},
            {"model": MODEL, "kind": "task", "sample_ids": task_samples, "tasks": ["shape"]},
        ):
            resp = api.post("/v1/forget-requests", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
            assert resp.status_code in (200, 201), resp.text
            ids.append(resp.json()["id"])

        result = pipeline.run_one_round(ctx, MODEL)
        assert result is not None
        assert (result.status, result.version) == ("published", 2), result
        assert set(result.requests) == set(ids)
        for request_id in ids:
            assert api.get(f"/v1/forget-requests/{request_id}").json()["status"] == "completed"

        # the API app over its ASGI transport: Starlette's TestClient has httpx.Client's interface
        served = independent_client.pull_and_load(cast(httpx.Client, api), MODEL, tmp_path / "host")
    assert (tmp_path / "host" / "v2" / "adapter_model.safetensors").is_file()

    artifacts = ctx.artifacts(MODEL)
    worker_model = load_adapter(
        artifacts.base_dir, artifacts.adapters_dir / version_dir_name(result.round_id, result.fencing_token)
    )
    inputs = {"pixel_values": workload.heldout_data().inputs["pixel_values"][:16]}
    with torch.no_grad():
        expected = worker_model(inputs)
    got = independent_client.outputs(served, inputs)
    assert set(got) == {"shape", "scale", "position_x", "subset_id"}
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    base_only = independent_client.outputs(independent_client.load_base(tmp_path / "host" / "base"), inputs)
    assert not torch.equal(base_only["shape"], got["shape"])  # the adapter is applied, not just the base
