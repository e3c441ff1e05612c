"""Helpers of the full-system tests: a prepared model template and a running API + worker stack.

The model is prepared once per test session (small training settings) into a template directory;
every stack copies it, so that each test starts from v1 without training again. The stack runs the
real API (uvicorn subprocess), real Celery worker processes and the Redis server of
``LETHE_TEST_REDIS_URL`` (a dedicated database number, flushed per stack).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from service.settings import Settings
from worker.embedded import EmbeddedStack

MODEL = "digits"
#: small training settings: seconds per round on 2 CPU cores
SMALL_SETTINGS: dict[str, Any] = {
    "pretrain": {"epochs": 5},
    "train": {"epochs": 6, "main_only_epochs": 2},
}
#: Redis databases the stacks use, one per stack in turn: a stack that is still running (a
#: module-scoped one) must not consume another stack's wake-ups from the same queue.
TEST_REDIS_DBS = tuple(range(8, 16))
_next_db = itertools.count()


def prepare_template(home: Path, database_url: str | None = None) -> Path:
    """Migrate, register MODEL with small settings, train v1 (in this process)."""
    from worker import models as ops

    settings = Settings(home=home, database_url=database_url)
    ops.create_model(MODEL, workload="digits-clients", settings=SMALL_SETTINGS, app_settings=settings)
    ops.prepare_here(MODEL, app_settings=settings)
    return home


def broker_url(redis_server_url: str) -> str:
    """A Redis database of its own for the next stack, on the test server."""
    base = redis_server_url.rsplit("/", 1)[0] if redis_server_url.count("/") > 2 else redis_server_url
    return f"{base}/{TEST_REDIS_DBS[next(_next_db) % len(TEST_REDIS_DBS)]}"


class System:
    """A running stack on a copy of the template, with an API key and helpers."""

    def __init__(self, stack: EmbeddedStack, key: str) -> None:
        self.stack = stack
        self.home = stack.home
        self.api = stack.api_url
        self.key = key
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def submit(self, body: dict[str, Any]) -> str:
        resp = self.http.post(
            f"{self.api}/v1/forget-requests",
            json={"model": MODEL, **body},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert resp.status_code in (200, 201), resp.text
        request_id = resp.json()["id"]
        assert isinstance(request_id, str)
        return request_id

    def request(self, request_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.api}/v1/forget-requests/{request_id}")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert isinstance(body, dict)
        return body

    def wait(self, request_id: str, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.request(request_id)
            if body["status"] in statuses:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"request {request_id} is {body['status']} after {timeout:.0f} s\n{self.logs()}"
                )
            time.sleep(0.25)

    def wait_file(self, path: Path, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)
        time.sleep(0.05)
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
        return data

    def wait_until(self, condition: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.home / "lethe.db") as conn:
            return list(conn.execute(query, args))

    def kill_worker(self, index: int = 0) -> None:
        proc = self.stack.worker_procs[index]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def logs(self) -> str:
        out = []
        for path in sorted((self.home / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-40:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    @property
    def adapters_dir(self) -> Path:
        return Settings(home=self.home).resolved_artifacts_dir / MODEL / "adapters"

    @property
    def data_dir(self) -> Path:
        return Settings(home=self.home).resolved_data_dir / MODEL


def _create_key(home: Path, database_url: str | None) -> str:
    from service.db.session import create_db_engine, make_session_factory, transaction
    from service.repositories import keys as keys_repo

    engine = create_db_engine(Settings(home=home, database_url=database_url).resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            _, secret = keys_repo.create_key(session, ["submit", "serve", "admin"], name="tests")
    finally:
        engine.dispose()
    return secret


@contextmanager
def running_system(
    template: Path,
    home: Path,
    redis_server_url: str | None,
    *,
    env: dict[str, str] | None = None,
    database_url: str | None = None,
) -> Iterator[System]:
    """A stack (API + one CPU worker) on a copy of ``template``; stopped and cleaned on exit.

    ``redis_server_url`` None: the stack's own embedded Redis (a test may stop and restart it).
    ``database_url``: a database the template was prepared in (default: the copied SQLite file).
    """
    if template != home:
        shutil.copytree(template, home)
    url = broker_url(redis_server_url) if redis_server_url else None
    if url is not None:
        client: redis.Redis[bytes] = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    stack_env = {
        "LETHE_LEASE_SECONDS": "4",
        "LETHE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "LETHE_WORKER_TORCH_THREADS": "1",
        "LETHE_DATABASE_URL": database_url or "",
        **(env or {}),
    }
    stack = EmbeddedStack(
        home=home,
        env=stack_env,
        broker_url=url,
        restart_workers=False,
        worker_args=["--gpus", "none"],
        run_migrations=False,  # the template is migrated
    )
    key = _create_key(home, database_url)
    with stack:
        system = System(stack, key)
        try:
            yield system
        finally:
            system.http.close()
