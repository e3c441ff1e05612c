"""End to end against a real S3-compatible server (moto's standalone server over HTTP): workers with
separate artifacts directories publish rounds into the bucket, and the API, with no artifacts
directory of its own, serves them; the pulled files match their sha256.

Issue 10 part 6: API, workers and serving hosts share no filesystem. The engine is a stand-in
(``worker.unlearning.engine`` replaced in ``sys.modules``) that checks what the worker fetched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import registry, rounds
from service.api.app import create_app
from service.db.migrate import upgrade
from service.db.session import transaction
from service.repositories import keys as keys_repo
from service.settings import Settings
from service.storage import make_store
from service.storage.s3 import S3Store
from tests.worker.requests import submit_client
from worker import context as worker_context
from worker import pipeline
from worker.artifacts import STATE_FILE, ModelArtifacts
from worker.config import WorkerSettings

MODEL = "m1"
BASE = {"config.json": b'{"input_dim": 4}', "model.safetensors": b"base weights"}


@dataclass
class Cluster:
    bucket: S3Store
    api: Settings
    workers: list[pipeline.WorkerContext]


def _settings(home: Path, db: str, url: str, bucket: str) -> Settings:
    return Settings(
        home=home, database_url=db, artifact_store="s3", s3_endpoint_url=url, s3_bucket=bucket,
        s3_prefix="lethe", s3_region="us-east-1", s3_access_key_id="test", s3_secret_access_key="test",
        retry_base_seconds=0,
    )  # fmt: skip


@pytest.fixture
def cluster(tmp_path: Path, s3_server_url: str) -> Iterator[Cluster]:
    db = f"sqlite:///{tmp_path / 'lethe.db'}"
    upgrade(db)
    name = f"lethe-{uuid.uuid4().hex[:12]}"
    homes = [tmp_path / "worker-a", tmp_path / "worker-b"]
    workers = [
        pipeline.WorkerContext.create(
            _settings(home, db, s3_server_url, name), WorkerSettings(device="cpu"), worker_id=home.name
        )
        for home in homes
    ]
    bucket = make_store(workers[0].settings)
    assert isinstance(bucket, S3Store)
    bucket.client.create_bucket(Bucket=name)
    # worker a prepares: base and v1 into the bucket, then the database names them
    store = workers[0].artifacts(MODEL)
    for file, body in BASE.items():
        store.base_dir.mkdir(parents=True, exist_ok=True)
        (store.base_dir / file).write_bytes(body)
    base_files = store.upload_base()
    staging = store.staging_dir("0-1")
    (staging / "adapter_model.safetensors").write_bytes(b"v1")
    (staging / STATE_FILE).write_text('{"forgotten_clients": []}')
    store.keep_state(staging, "0-1")
    v1 = store.commit(staging, "0-1", parent_version=None, requests=[], evidence={})
    with transaction(workers[0].session_factory) as session:
        registry.register(session, MODEL, workload="digits-clients", method="default", method_config={},
                          settings={})  # fmt: skip
        rounds.register_prepared_model(
            session, MODEL, subjects={"c0": ["s0"], "c1": ["s1"], "c2": ["s2"]}, location=v1.location,
            files={k: rounds.FileDigest(v.sha256, v.size) for k, v in v1.files.items()}, evidence={},
            tasks=["t"], base_location=f"{MODEL}/base",
            base_files={k: rounds.FileDigest(v.sha256, v.size) for k, v in base_files.items()},
        )  # fmt: skip
    yield Cluster(bucket, _settings(tmp_path / "api", db, s3_server_url, name), workers)
    for ctx in workers:
        ctx.close()


@pytest.fixture
def engine_stub(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``run_round`` stands in for the engine: records what it was given (the fetched parent, base,
    state) and writes the new version; the workload is not loaded."""
    seen: list[dict[str, Any]] = []

    def run_round(_workload: object, *, base_dir: Path, adapter_in: Path, adapter_out: Path,
                  requests: list[Any], state_in: Path, **_: object) -> Any:  # fmt: skip
        seen.append({
            "base": {p.name: p.read_bytes() for p in sorted(base_dir.iterdir())},
            "parent": (adapter_in / "adapter_model.safetensors").read_bytes(),
            "state": json.loads(state_in.read_text()),
        })  # fmt: skip
        forgotten = seen[-1]["state"]["forgotten_clients"] + [r.client_id for r in requests]
        (adapter_out / "adapter_model.safetensors").write_bytes(f"v{len(seen) + 1}".encode())
        (adapter_out / "adapter_config.json").write_text("{}")
        (adapter_out / STATE_FILE).write_text(json.dumps({"forgotten_clients": forgotten}))
        return types.SimpleNamespace(
            evidence={r.request_id: {"fake": True} for r in requests}, next_importance=None
        )

    engine = types.ModuleType("worker.unlearning.engine")
    engine.run_round = run_round  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "worker.unlearning.engine", engine)
    monkeypatch.setattr(worker_context, "_load_workload", lambda model: None)
    return seen


def _published(result: pipeline.RoundResult | None, version: int) -> pipeline.RoundResult:
    assert result is not None
    assert (result.status, result.version) == ("published", version), result
    return result


def _keys(bucket: S3Store) -> list[str]:
    listed = bucket.client.list_objects_v2(Bucket=bucket.bucket).get("Contents", [])
    return sorted(str(o["Key"]) for o in listed)


def test_rounds_publish_into_the_bucket_and_the_api_serves_them(
    cluster: Cluster, engine_stub: list[dict[str, Any]]
) -> None:
    a, b = cluster.workers
    # worker b has nothing on its disk: base, v1 and v1's state come from the bucket
    submit_client(b, MODEL, "c0")
    _published(pipeline.run_one_round(b, MODEL), 2)
    assert engine_stub[0] == {"base": BASE, "parent": b"v1", "state": {"forgotten_clients": []}}
    v1_blob = hashlib.sha256(b"v1").hexdigest()
    assert not (b.settings.resolved_home / "blob-cache" / v1_blob[:2] / v1_blob).exists()  # withdrawn
    # worker a wrote v1 but never saw v2: it fetches v2 (and its worker-side state) from the bucket
    submit_client(a, MODEL, "c1")
    second = _published(pipeline.run_one_round(a, MODEL), 3)
    assert engine_stub[1]["parent"] == b"v2"
    assert engine_stub[1]["state"] == {"forgotten_clients": ["c0"]}
    # v1, withdrawn by worker b, left worker a's disk too (reconciliation reads b's tombstone)
    assert not (a.artifacts(MODEL).adapters_dir / "0-1").exists()
    assert a.artifacts(MODEL).tombstone_path(1).is_file()

    keys = _keys(cluster.bucket)
    assert not [k for k in keys if "/.staging/" in k or k.startswith("lethe/.staging")], keys
    assert not [k for k in keys if k.startswith(("lethe/m1/adapters/0-1/", "lethe/m1/adapters/1-"))], keys
    assert {"lethe/m1/tombstones/1.json", "lethe/m1/tombstones/2.json"} <= set(keys)
    assert f"lethe/m1/state/{second.round_id}-{second.fencing_token}.json" in keys  # the next round's input

    with transaction(a.session_factory) as session:
        _, secret = keys_repo.create_key(session, ["serve"])
    auth = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(cluster.api)) as client:
        latest = client.get(f"/v1/models/{MODEL}/adapters/latest", headers=auth)
        assert latest.status_code == 200, latest.text
        assert latest.json()["version"] == 3
        files = latest.json()["files"]
        names = {f["name"] for f in files}
        assert names == {"adapter_model.safetensors", "adapter_config.json", "manifest.json"}
        for file in files:
            got = client.get(file["url"], headers=auth)
            assert got.status_code == 200, got.text
            assert hashlib.sha256(got.content).hexdigest() == file["sha256"]
            assert got.headers["X-Checksum-SHA256"] == file["sha256"]
            assert int(got.headers["Content-Length"]) == file["size"]
            head = client.head(file["url"], headers=auth)
            assert head.status_code == 200
            assert head.content == b""
            assert int(head.headers["Content-Length"]) == file["size"]
            cached = client.get(file["url"], headers={**auth, "If-None-Match": got.headers["ETag"]})
            assert cached.status_code == 304
        assert client.get(files[0]["url"].replace("/3/", "/1/"), headers=auth).status_code == 410
        base = client.get(f"/v1/models/{MODEL}/base", headers=auth).json()["files"]
        for file in base:
            got = client.get(file["url"], headers=auth)
            assert got.content == BASE[file["name"]]
    assert not cluster.api.resolved_artifacts_dir.exists()  # the API served from the bucket alone


def test_a_version_missing_from_the_bucket_is_a_404_not_a_500(
    cluster: Cluster, engine_stub: list[dict[str, Any]]
) -> None:
    """A file the database names but the bucket lacks (deleted by hand, a lifecycle rule): 404."""
    cluster.bucket.delete(f"{MODEL}/adapters/0-1/adapter_model.safetensors")
    with transaction(cluster.workers[0].session_factory) as session:
        _, secret = keys_repo.create_key(session, ["serve"])
    with TestClient(create_app(cluster.api)) as client:
        url = f"/v1/models/{MODEL}/adapters/1/files/adapter_model.safetensors"
        got = client.get(url, headers={"Authorization": f"Bearer {secret}"})
        assert got.status_code == 404, got.text
        assert got.headers["content-type"] == "application/problem+json"


def test_an_unreachable_object_store_is_a_503_not_a_500(
    cluster: Cluster, engine_stub: list[dict[str, Any]]
) -> None:
    """The API cannot reach the bucket (endpoint down): 503 problem with Retry-After, never a 500."""
    with transaction(cluster.workers[0].session_factory) as session:
        _, secret = keys_repo.create_key(session, ["serve"])
    down = cluster.api.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    with TestClient(create_app(down)) as client:
        url = f"/v1/models/{MODEL}/adapters/1/files/adapter_model.safetensors"
        got = client.get(url, headers={"Authorization": f"Bearer {secret}"})
        assert got.status_code == 503, got.text
        assert got.headers["content-type"] == "application/problem+json"
        assert got.headers["Retry-After"] == "5"


def test_a_worker_that_lost_its_disk_refetches_and_verifies(
    cluster: Cluster, engine_stub: list[dict[str, Any]]
) -> None:
    """The local copy is a cache: wiped, or altered, it is fetched again from the bucket by sha256."""
    a = cluster.workers[0]
    store: ModelArtifacts = a.artifacts(MODEL)
    (store.adapters_dir / "0-1" / "adapter_model.safetensors").write_bytes(b"tampered")
    shutil.rmtree(store.base_dir)
    shutil.rmtree(a.settings.resolved_home / "blob-cache", ignore_errors=True)
    submit_client(a, MODEL, "c2")
    _published(pipeline.run_one_round(a, MODEL), 2)
    assert engine_stub[0]["parent"] == b"v1"
    assert engine_stub[0]["base"] == BASE


def test_a_failed_upload_leaves_nothing_behind_and_the_round_is_retried(
    cluster: Cluster, engine_stub: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's upload fails: the round fails (retryable), its files leave the bucket and the
    disk, no staging key is left, and the database still names v1; the next attempt publishes."""
    a = cluster.workers[0]
    store = a.artifacts(MODEL)
    assert store.remote is not None
    real_put = type(store.remote).put_file

    def flaky(self: S3Store, key: str, path: Path, sha256: str) -> None:
        if key.endswith("/manifest.json") and "/adapters/0-" not in key:
            raise OSError("connection reset")
        real_put(self, key, path, sha256)

    monkeypatch.setattr(S3Store, "put_file", flaky)
    submit_client(a, MODEL, "c0")
    failed = pipeline.run_one_round(a, MODEL)
    assert failed is not None
    assert failed.status == "failed", failed
    name = f"{failed.round_id}-{failed.fencing_token}"
    assert not [k for k in _keys(cluster.bucket) if f"/adapters/{name}/" in k or "/.staging/" in k]
    assert not (store.adapters_dir / name).exists()
    monkeypatch.setattr(S3Store, "put_file", real_put)
    _published(pipeline.run_one_round(a, MODEL), 2)


def test_orphans_in_the_bucket_are_collected_and_foreign_versions_spared(
    cluster: Cluster, engine_stub: list[dict[str, Any]]
) -> None:
    """What a crashed attempt left in the bucket (no manifest: never sealed; or a state file of no
    version) is deleted under the next round's lease; a sealed version of a round this database
    does not know (a restore mix-up) is not."""
    bucket = cluster.bucket
    bucket.put_bytes(f"{MODEL}/adapters/7-3/adapter_model.safetensors", b"half")
    bucket.put_bytes(f"{MODEL}/state/7-3.json", b"{}")
    foreign = {"format": 1, "files": {}, "round_id": 999, "fencing_token": 999}
    bucket.put_bytes(f"{MODEL}/adapters/999-999/manifest.json", json.dumps(foreign).encode())
    submit_client(cluster.workers[1], MODEL, "c0")
    _published(pipeline.run_one_round(cluster.workers[1], MODEL), 2)
    keys = _keys(bucket)
    assert not [k for k in keys if "7-3" in k], keys
    assert "lethe/m1/adapters/999-999/manifest.json" in keys
