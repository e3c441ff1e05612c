"""Full-system tests: real API process, real Celery worker processes, real Redis server.

POST → completed → latest adapter changed → pulled, loaded with PeftModel.from_pretrained and equal
to the worker's outputs; withdrawn versions answer 410; purged samples are gone; SIGKILL of the
worker at each dangerous step of a round → completed once, one new version; the hard time limit
ends a hung worker and the round is retried once; three requests complete in arrival order (one
round per wake message); with the broker down requests are accepted and processed once it is back.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sqlalchemy import create_engine, text

from service import pull
from tests.worker.system import MODEL, SMALL_SETTINGS, System, prepare_template, running_system
from worker.artifacts import verify_directory
from worker.unlearning.adapter_io import load_adapter
from worker.unlearning.datastore import DataStore
from worker.unlearning.model import load_base
from worker.watchdog import HARD_LIMIT_EXIT_CODE

pytestmark = [pytest.mark.redis, pytest.mark.timeout(400)]


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_template(tmp_path_factory.mktemp("lethe-template") / "home")


@pytest.fixture(scope="module")
def completed(
    template: Path, tmp_path_factory: pytest.TempPathFactory, redis_server_url: str
) -> Iterator[tuple[System, str, dict[str, object]]]:
    """One stack, one per-client request run to completion (shared by the tests below)."""
    home = tmp_path_factory.mktemp("lethe-system") / "home"
    with running_system(template, home, redis_server_url) as system:
        v1_dir = pull.pull_once(system.http, system.api, MODEL, home.parent / "before")
        assert v1_dir.version == 1
        request_id = system.submit({"kind": "client", "client_id": "c2"})
        body = system.wait(request_id, {"completed", "failed"})
        yield system, request_id, body


def test_post_to_served_adapter(completed: tuple[System, str, dict[str, object]], tmp_path: Path) -> None:
    system, request_id, body = completed
    assert body["status"] == "completed", system.logs()
    assert body["version"] == 2
    assert body["attempts"] == 1
    # the serving host's view: latest moved to v2, files verified, directory swapped
    dest = tmp_path / "serving"
    result = pull.pull_once(system.http, system.api, MODEL, dest)
    assert result.version == 2
    assert result.path is not None
    base_dir = pull.pull_base(system.http, system.api, MODEL, tmp_path / "base")
    served = PeftModel.from_pretrained(load_base(base_dir), str(dest / pull.CURRENT_LINK))
    served.eval()
    # the worker's own output: its version directory, loaded with the engine's loader
    (location,) = system.sql(
        "select v.location from adapter_versions v join models m on m.id = v.model_id "
        "where m.name = ? and v.version = 2",
        MODEL,
    )[0:1]
    worker_dir = system.home / "artifacts" / location[0]
    worker_model = load_adapter(base_dir, worker_dir)
    before = PeftModel.from_pretrained(load_base(base_dir), str(system.home.parent / "before" / "current"))
    before.eval()
    x = {"x": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        out_served, out_worker, out_before = served(x), worker_model(x), before(x)
    for name in out_worker:
        assert torch.equal(out_served[name], out_worker[name]), name
    assert any(not torch.allclose(out_served[n], out_before[n]) for n in out_worker)  # latest changed
    # evidence and events over HTTP
    evidence = system.http.get(f"{system.api}/v1/forget-requests/{request_id}/evidence")
    assert evidence.status_code == 200
    events = system.http.get(f"{system.api}/v1/forget-requests/{request_id}/events").json()
    kinds = [e["type"] for e in (events if isinstance(events, list) else events["items"])]
    assert kinds[0] == "received"
    assert kinds[-1] == "completed"
    assert "claimed" in kinds
    manifest = json.loads((worker_dir / "manifest.json").read_text())
    assert manifest["parent_version"] == 1
    assert manifest["requests"] == [request_id]


def test_withdrawn_version_answers_410(completed: tuple[System, str, dict[str, object]]) -> None:
    system, _, _ = completed
    assert system.http.get(f"{system.api}/v1/models/{MODEL}/adapters/1").status_code == 410
    files = system.http.get(f"{system.api}/v1/models/{MODEL}/adapters/1/files/adapter_model.safetensors")
    assert files.status_code == 410
    latest = system.http.get(f"{system.api}/v1/models/{MODEL}/adapters/latest").json()
    assert latest["version"] == 2
    # the withdrawn version's files are gone; its tombstone keeps the hashes
    tomb = json.loads((system.adapters_dir.parent / "tombstones" / "1.json").read_text())
    assert tomb["version"] == 1
    assert "adapter_model.safetensors" in tomb["files"]
    assert not (system.adapters_dir.parent.parent.parent / tomb["location"]).exists()


def test_purged_samples_are_gone(completed: tuple[System, str, dict[str, object]]) -> None:
    system, _, _ = completed
    store = DataStore(system.data_dir)
    assert store.client_samples("c2") is None
    assert not (system.data_dir / "clients" / "c2.npz").exists()
    assert "c2" in json.loads((system.data_dir / "store.json").read_text())["purged_clients"]
    rows = system.sql(
        "select count(*), sum(purged) from samples s join models m on m.id = s.model_id "
        "where m.name = ? and s.client_id = 'c2'",
        MODEL,
    )
    count, purged = rows[0]
    assert count > 0
    assert purged == count
    assert system.sql("select purged_at is not null from subjects where client_id = 'c2'") == [(1,)]
    # the other clients are untouched
    assert store.client_samples("c3") is not None


def test_sigkill_at_every_step_completes_once(template: Path, tmp_path: Path, redis_server_url: str) -> None:
    """SIGKILL the worker at each dangerous step of one round, starting a new worker after each kill:

    1. mid-engine (a live round, a staging directory);
    2. after the version directory was sealed and renamed into place, before ``publish_round``
       committed (an orphan directory no database row names);
    3. after ``publish_round`` committed, before the withdrawn version's files were deleted and the
       subject's raw data purged;
    4. (in the restarted worker's reconciliation) after the raw data was deleted, before the purge
       was recorded in the database.

    In the end: exactly one new version, one completion, one evidence row; the killed attempts'
    directories collected, the withdrawn version's files deleted (tombstone kept), the purge done
    and recorded."""
    env = {"LETHE_WORKER_FAULT_PAUSE": "progress:600", "LETHE_MAX_CRASHES": "5"}
    with running_system(template, tmp_path / "home", redis_server_url, env=env) as system:
        request_id = system.submit({"kind": "client", "client_id": "c4"})
        assert _v1_dir(system).is_dir()
        steps = ("progress", "committed", "published", "store_purged", None)
        for step, after in itertools.pairwise(steps):
            assert step is not None
            system.wait_file(system.home / f"fault-{step}")
            system.kill_worker()
            _assert_state_at_kill(system, step, request_id)
            if after is None:
                del system.stack.env["LETHE_WORKER_FAULT_PAUSE"]
            else:
                system.stack.env["LETHE_WORKER_FAULT_PAUSE"] = f"{after}:600"
            system.stack.start_worker(0)
        location = _completed_once_as_v2(system, request_id, runs=3)
        assert Path(location).name == "1-3"  # written by the third attempt (fencing token 3)
        # the last worker reconciles: withdrawn files, the purge recorded
        tombstone = system.adapters_dir.parent / "tombstones" / "1.json"

        def settled() -> bool:
            remaining = sorted(p.name for p in system.adapters_dir.iterdir())
            return remaining == ["1-3"] and tombstone.exists() and _purge_recorded(system, "c4")

        system.wait_until(settled)
        assert DataStore(system.data_dir).client_samples("c4") is None


def _completed_once_as_v2(system: System, request_id: str, *, runs: int) -> str:
    """The request completed once, after ``runs`` runs (one claim, ``runs - 1`` crashes resumed),
    as the only new version (v2), with one evidence row; the location of v2."""
    body = system.wait(request_id, {"completed", "failed"})
    assert body["status"] == "completed", system.logs()
    assert (body["version"], body["attempts"], body["crashes"]) == (2, 1, runs - 1)
    versions = system.sql("select version, status, location from adapter_versions order by version")
    assert [(v, s) for v, s, _ in versions] == [(1, "withdrawn"), (2, "active")]
    assert system.sql("select count(*) from evidence where request_id = ?", request_id) == [(1,)]
    events = [e for (e,) in system.sql("select type from request_events where request_id = ?", request_id)]
    assert events.count("completed") == 1
    assert events.count("resumed") == runs - 1
    return str(versions[1][2])


def _v1_dir(system: System) -> Path:
    ((location,),) = system.sql("select location from adapter_versions where version = 1")
    return system.home / "artifacts" / str(location)


def _purge_recorded(system: System, client: str) -> bool:
    rows = system.sql("select purged_at is not null from subjects where client_id = ?", client)
    return rows == [(1,)]


def _assert_state_at_kill(system: System, step: str, request_id: str) -> None:
    """What the database and the disk hold right after the worker was killed at ``step``."""
    status = system.request(request_id)["status"]
    versions = system.sql("select version, status from adapter_versions order by version")
    in_store = DataStore(system.data_dir).client_samples("c4") is not None
    if step in ("progress", "committed"):  # nothing published yet
        assert status in {"running", "verifying"}, step
        assert versions == [(1, "active")], step
        assert in_store
    if step == "committed":  # the sealed, complete but unpublished directory of attempt 2
        sealed = [p for p in system.adapters_dir.iterdir() if p.name.startswith("1-")]
        assert [p.name for p in sealed] == ["1-2"]
        verify_directory(sealed[0])
    if step == "published":  # published, nothing cleaned up yet
        assert status == "completed"
        assert versions == [(1, "withdrawn"), (2, "active")]
        assert _v1_dir(system).is_dir()  # the withdrawn version's files are still there
        assert in_store
    if step == "store_purged":  # raw data gone, the purge not yet recorded
        assert not _v1_dir(system).exists()
        assert not in_store
        assert not _purge_recorded(system, "c4")


def test_hard_time_limit_ends_the_worker_and_the_round_is_retried_once(
    template: Path, tmp_path: Path, redis_server_url: str
) -> None:
    """With the solo pool Celery enforces no time limit; the watchdog does. A round hung in a C call
    (the fault pause sleeps; an asynchronous soft-limit exception cannot land there) past the hard
    limit ends the worker process with exit code 75. A new worker resumes the round once the lease
    expires: one new version, one completion, two attempts."""
    env = {
        "LETHE_WORKER_FAULT_PAUSE": "progress:600",
        "LETHE_WORKER_SOFT_TIME_LIMIT": "8",
        "LETHE_WORKER_HARD_TIME_LIMIT": "10",
    }
    with running_system(template, tmp_path / "home", redis_server_url, env=env) as system:
        request_id = system.submit({"kind": "client", "client_id": "c9"})
        system.wait_file(system.home / "fault-progress")
        worker = system.stack.worker_procs[0]
        assert worker.wait(timeout=60) == HARD_LIMIT_EXIT_CODE, system.logs()
        assert "exceeded the hard time limit" in (system.home / "logs" / "worker-0.log").read_text()
        assert system.request(request_id)["status"] == "running"
        for name in (
            "LETHE_WORKER_FAULT_PAUSE",
            "LETHE_WORKER_SOFT_TIME_LIMIT",
            "LETHE_WORKER_HARD_TIME_LIMIT",
        ):
            del system.stack.env[name]
        system.stack.start_worker(0)
        _completed_once_as_v2(system, request_id, runs=2)


def test_three_requests_complete_in_arrival_order(
    template: Path, tmp_path: Path, redis_server_url: str
) -> None:
    env = {"LETHE_MAX_REQUESTS_PER_ROUND": "1"}
    with running_system(template, tmp_path / "home", redis_server_url, env=env) as system:
        ids = [system.submit({"kind": "client", "client_id": c}) for c in ("c5", "c6", "c7")]
        bodies = [system.wait(rid, {"completed", "failed"}) for rid in ids]
        assert [b["status"] for b in bodies] == ["completed"] * 3, system.logs()
        assert [b["version"] for b in bodies] == [2, 3, 4]
        completed_at = [b["completed_at"] for b in bodies]
        assert completed_at == sorted(completed_at)
        versions = system.sql("select version, parent_version, status from adapter_versions order by version")
        assert versions == [
            (1, None, "withdrawn"),
            (2, 1, "withdrawn"),
            (3, 2, "withdrawn"),
            (4, 3, "active"),
        ]


def test_broker_down_requests_accepted_and_processed_when_back(template: Path, tmp_path: Path) -> None:
    """The stack's own Redis is stopped: POST still answers 201; once Redis is back, it completes."""
    with running_system(template, tmp_path / "home", None) as system:
        system.wait_until(lambda: bool(system.sql("select 1 from workers where state = 'idle'")))
        system.stack.redis.stop()
        resp = system.http.post(
            f"{system.api}/v1/forget-requests",
            json={"model": MODEL, "kind": "client", "client_id": "c8"},
            headers={"Idempotency-Key": "broker-down"},
        )
        assert resp.status_code == 201, resp.text  # accepted: the database is the queue
        request_id = resp.json()["id"]
        assert system.request(request_id)["status"] == "queued"
        time.sleep(2)
        assert system.request(request_id)["status"] == "queued"  # nothing can wake a worker
        system.stack.redis.start()  # same port, same append-only file
        body = system.wait(request_id, {"completed", "failed"})
        assert body["status"] == "completed", system.logs()
        assert body["version"] == 2
        # a model registered over HTTP is prepared by the worker (lethe.prepare_model)
        resp = system.http.post(
            f"{system.api}/v1/admin/models",
            json={"name": "digits-two", "workload": "digits-clients", "settings": SMALL_SETTINGS},
        )
        assert resp.status_code == 201, resp.text

        def prepared() -> bool:
            detail = system.http.get(f"{system.api}/v1/admin/models/digits-two").json()
            assert detail["status"] != "failed", detail
            return bool(detail["status"] == "ready" and detail["versions"])

        system.wait_until(prepared, timeout=120)


@pytest.mark.postgres
def test_postgres_sigkill_mid_round(
    tmp_path: Path, redis_server_url: str, make_postgres_database: Callable[[], str]
) -> None:
    """The same crash on PostgreSQL (FOR UPDATE SKIP LOCKED claims): completed once, one version."""
    database_url = make_postgres_database()
    home = prepare_template(tmp_path / "home", database_url)
    env = {"LETHE_WORKER_FAULT_PAUSE": "progress:600"}
    with running_system(home, home, redis_server_url, env=env, database_url=database_url) as system:
        request_id = system.submit({"kind": "client", "client_id": "c1"})
        system.wait_file(system.home / "fault-progress")
        system.kill_worker()
        del system.stack.env["LETHE_WORKER_FAULT_PAUSE"]
        system.stack.start_worker(0)
        body = system.wait(request_id, {"completed", "failed"})
        assert body["status"] == "completed", system.logs()
        assert body["version"] == 2
        assert (body["attempts"], body["crashes"]) == (1, 1)  # a lost worker is a crash, not an attempt
        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                versions = conn.execute(text("select version, status from adapter_versions order by version"))
                assert [tuple(r) for r in versions] == [(1, "withdrawn"), (2, "active")]
                evidence = conn.execute(
                    text("select count(*) from evidence where request_id = :r"), {"r": request_id}
                )
                assert evidence.scalar_one() == 1
        finally:
            engine.dispose()
        assert system.http.get(f"{system.api}/v1/models/{MODEL}/adapters/1").status_code == 410
