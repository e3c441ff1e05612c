"""The ``lethe`` console script: keys, migrate, sweep, and plugin commands from entry points."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import EntryPoint
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import Session

from service import cli
from service.db import migrate
from service.repositories import keys as keys_repo

plugin = click.Command("hello", callback=lambda: click.echo("hello from a plugin"))


def test_migrate_then_keys_create_prints_a_key_once_and_stores_its_hash(home: Path) -> None:
    runner = CliRunner()
    migrated = runner.invoke(cli.main, ["migrate"])
    assert migrated.exit_code == 0, migrated.output
    engine = create_engine(f"sqlite:///{home / 'lethe.db'}")
    assert "forget_requests" in inspect(engine).get_table_names()

    created = runner.invoke(cli.main, ["keys", "create", "--scope", "submit", "--scope", "serve"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[0]
    assert secret.startswith("lethe_")
    with Session(engine) as session:
        row = keys_repo.find_active(session, secret)
        assert row is not None
        assert row.scopes == ["serve", "submit"]
        assert row.key_hash != secret
        assert secret not in row.key_hash
    engine.dispose()

    wrong = runner.invoke(cli.main, ["keys", "create", "--scope", "root"])
    assert wrong.exit_code == 2


@pytest.mark.parametrize("name", ["", "tab\there", "\x7f", "x" * 201])
def test_keys_create_refuses_a_name_the_api_would_refuse(home: Path, name: str) -> None:
    """Failed before: the CLI stored names (empty, control characters, 300 characters) that the
    API's `POST /v1/admin/keys` refuses."""
    runner = CliRunner()
    assert runner.invoke(cli.main, ["migrate"]).exit_code == 0
    refused = runner.invoke(cli.main, ["keys", "create", "--scope", "admin", "--name", name])
    assert refused.exit_code == 2
    assert "Invalid value for '--name'" in refused.output
    assert runner.invoke(cli.main, ["keys", "list"]).output.count("\n") == 1  # the header alone
    accepted = runner.invoke(cli.main, ["keys", "create", "--scope", "admin", "--name", "ops " + "x" * 196])
    assert accepted.exit_code == 0, accepted.output


def test_a_bad_log_level_is_a_usage_error(home: Path) -> None:
    """Failed before: `lethe --log-level LOUD migrate` was a ValueError traceback."""
    result = CliRunner().invoke(cli.main, ["--log-level", "LOUD", "migrate"])
    assert result.exit_code == 2
    assert "Invalid value for '--log-level'" in result.output
    assert CliRunner().invoke(cli.main, ["--log-level", "info", "sweep"]).exit_code == 1  # case-insensitive


def test_sweep_needs_a_broker(home: Path) -> None:
    result = CliRunner().invoke(cli.main, ["sweep"])
    assert result.exit_code == 1
    assert "LETHE_BROKER_URL" in result.output


def test_a_plugin_that_fails_to_import_breaks_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [
        EntryPoint(name="broken", value="no_such_module_xyz:command", group=cli.ENTRY_POINT_GROUP),
        EntryPoint(name="hello", value=f"{__name__}:plugin", group=cli.ENTRY_POINT_GROUP),
        EntryPoint(name="notacommand", value="os:sep", group=cli.ENTRY_POINT_GROUP),
        EntryPoint(name="migrate", value="no_such_module_xyz:command", group=cli.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: fake)
    runner = CliRunner()
    listing = runner.invoke(cli.main, ["--help"])
    assert listing.exit_code == 0, listing.output
    assert "broken" in listing.output
    assert "hello" in listing.output
    assert runner.invoke(cli.main, ["hello"]).output == "hello from a plugin\n"
    broken = runner.invoke(cli.main, ["broken", "--anything"])
    assert broken.exit_code == 1
    assert "'broken' is unavailable" in broken.output
    assert "no_such_module_xyz" in broken.output
    assert runner.invoke(cli.main, ["notacommand"]).exit_code == 1
    assert "Create or upgrade" in runner.invoke(cli.main, ["migrate", "--help"]).output


def test_serve_runs_the_api_on_the_embedded_default(home: Path) -> None:
    """``lethe serve --port N`` migrates the SQLite default, answers, and a new key works."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lethe = [sys.executable, "-c", "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"]
    env = {**os.environ, "LETHE_HOME": str(home)}
    proc = subprocess.Popen([*lethe, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_ready(proc, base, seconds=30)
        key = subprocess.run(
            [*lethe, "keys", "create", "--scope", "admin"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        response = httpx.get(f"{base}/v1/admin/models", headers={"Authorization": f"Bearer {key}"})
        assert (response.status_code, response.json()) == (200, [])
        assert (home / "lethe.db").is_file()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_log_level_warning_writes_no_access_log(home: Path) -> None:
    """Issue 10 part 5 (failed before: ``lethe serve`` gave uvicorn ``log_level="info"``, which sets
    the access logger to INFO whatever ``--log-level`` says, so the load test's Lethe wrote a log
    line per request while the bare endpoint wrote none): ``--log-level WARNING`` means no
    access-log lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lethe = [sys.executable, "-c", "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"]
    env = {**os.environ, "LETHE_HOME": str(home)}
    args = [*lethe, "--log-level", "WARNING", "serve", "--port", str(port)]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        _wait_until_ready(proc, f"http://127.0.0.1:{port}", seconds=30)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/admin/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.stderr is not None
    logged = proc.stderr.read().decode()
    proc.stderr.close()
    assert "/readyz" not in logged, logged
    assert "/v1/admin/models" not in logged, logged


def _bodies_transport(bodies: list[dict[str, object]]) -> httpx.MockTransport:
    """Answers GET /v1/forget-requests/<id> with ``bodies`` in turn (the last one repeated)."""
    served: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/forget-requests/r1"
        assert request.headers["authorization"] == "Bearer k"
        served.append(bodies[min(len(served), len(bodies) - 1)])
        return httpx.Response(200, json=served[-1])

    return httpx.MockTransport(handler)


def test_requests_follow_draws_the_rounds_progress_until_the_request_is_final(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 10 part 3: `lethe requests follow ID` polls the request and draws a plain-text bar of its
    round's stage (one line per change when not on a terminal); exit 0 once completed."""
    bodies: list[dict[str, object]] = [
        {"id": "r1", "status": "queued", "progress": None},
        {"id": "r1", "status": "running", "progress": {"stage": "partitions", "step": 1, "of": 2}},
        {"id": "r1", "status": "running", "progress": {"stage": "update", "step": 5, "of": 10}},
        {"id": "r1", "status": "verifying", "progress": {"stage": "publish", "step": 0, "of": 0}},
        {"id": "r1", "status": "completed", "version": 3, "progress": None},
    ]
    real_client = httpx.Client
    transport = _bodies_transport(bodies)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    result = CliRunner().invoke(
        cli.main, ["requests", "follow", "r1", "--api-key", "k", "--interval", "0"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "r1 queued    [..............................] waiting",
        "r1 running   [##............................] partitions 1/2",
        "r1 running   [############..................] update 5/10",
        "r1 verifying [#########################.....] publish",
        "r1 completed [##############################] v3",
    ]


def test_requests_follow_exits_1_with_the_stage_a_failed_request_stopped_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies: list[dict[str, object]] = [
        {
            "id": "r1",
            "status": "failed",
            "error": "CUDA out of memory",
            "progress": {"stage": "acceptance", "step": 0, "of": 0},
        }
    ]
    real_client = httpx.Client
    transport = _bodies_transport(bodies)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=transport, **kw))
    result = CliRunner().invoke(cli.main, ["requests", "follow", "r1", "--api-key", "k"])
    assert result.exit_code == 1
    assert "[###############...............] stopped at acceptance" in result.output
    assert "request r1 failed: CUDA out of memory" in result.output


@pytest.mark.parametrize("args", [["--interval", "-1"], ["--timeout", "-5"]])
def test_requests_follow_refuses_negative_times(args: list[str]) -> None:
    result = CliRunner().invoke(cli.main, ["requests", "follow", "r1", "--api-key", "k", *args])
    assert result.exit_code == 2
    assert f"Invalid value for '{args[0]}'" in result.output


def test_requests_follow_names_the_api_it_cannot_reach() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = CliRunner().invoke(cli.main, ["requests", "follow", "r1", "--api-key", "k", "--url", url])
    assert result.exit_code == 1
    assert f"Error: the API at {url} is unreachable" in result.output


def test_requests_follow_help_names_the_environment_variables() -> None:
    shown = CliRunner().invoke(cli.main, ["requests", "follow", "--help"]).output
    assert "LETHE_API_URL" in shown
    assert "LETHE_API_KEY" in shown


def test_serve_with_several_workers_needs_postgresql(home: Path) -> None:
    result = CliRunner().invoke(cli.main, ["serve", "--workers", "2"])
    assert result.exit_code == 2
    assert "--workers > 1 needs PostgreSQL" in result.output


def _children(pid: int) -> list[str]:
    """The command lines of ``pid``'s child processes (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return found


@pytest.mark.slow  # two fresh interpreters import the app: ~10-30 s on 2 busy cores
@pytest.mark.postgres
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts processes in /proc")
def test_serve_with_workers_runs_several_api_processes(
    home: Path, make_postgres_database: Callable[[], str]
) -> None:
    """Issue 10 part 5: ``lethe serve`` ran one process. ``--workers 2``: two uvicorn processes
    share the port, each with its own app (settings from the same environment)."""
    url = make_postgres_database()
    migrate.upgrade(url)
    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        _, key = keys_repo.create_key(session, ["admin"])
    engine.dispose()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lethe = [sys.executable, "-c", "import sys; from service.cli import main; sys.argv[0] = 'lethe'; main()"]
    env = {**os.environ, "LETHE_HOME": str(home), "LETHE_DATABASE_URL": url}
    args = [*lethe, "serve", "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_ready(proc, base, seconds=60)
        workers = [c for c in _children(proc.pid) if "spawn_main" in c]
        assert len(workers) == 2, _children(proc.pid)
        for _ in range(4):
            response = httpx.get(f"{base}/v1/admin/models", headers={"Authorization": f"Bearer {key}"})
            assert (response.status_code, response.json()) == (200, [])
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_until_ready(proc: subprocess.Popen[bytes], base: str, *, seconds: float) -> None:
    """Poll ``/readyz`` of a started ``lethe serve`` until 200; fail if it exits or times out."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"lethe serve did not become ready within {seconds} s"
        time.sleep(0.1)
