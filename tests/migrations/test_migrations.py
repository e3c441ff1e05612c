"""The Alembic chain on real databases: upgrade, downgrade, upgrade again, and no model drift."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from service.db import migrate
from service.db.models import Base

REPO = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _roundtrip(url: str) -> None:
    config = migrate.alembic_config(url)
    command.upgrade(config, "head")
    assert _tables(url) == set(Base.metadata.tables)
    command.check(config)  # raises if autogenerate would emit anything
    command.downgrade(config, "base")
    assert _tables(url) == set()
    command.upgrade(config, "head")
    command.check(config)
    assert _tables(url) == set(Base.metadata.tables)


def test_sqlite_roundtrip(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'lethe.db'}")


@pytest.mark.postgres
def test_postgres_roundtrip(make_postgres_database: Callable[[], str]) -> None:
    _roundtrip(make_postgres_database())


def test_alembic_cli_from_repo_root_uses_lethe_settings(tmp_path: Path) -> None:
    env = {**os.environ, "LETHE_HOME": str(tmp_path / "home")}
    env.pop("LETHE_DATABASE_URL", None)
    alembic = [sys.executable, "-m", "alembic"]
    for args in (["upgrade", "head"], ["check"]):
        result = subprocess.run([*alembic, *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / "lethe.db").is_file()
    url = f"sqlite:///{tmp_path / 'other.db'}"
    result = subprocess.run(
        [*alembic, "upgrade", "head"],
        cwd=REPO,
        env={**env, "LETHE_DATABASE_URL": url},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert _tables(url) == set(Base.metadata.tables)


def test_installed_layout_finds_migrations_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the API image: the package is installed, migrations/ sits in the working directory."""
    monkeypatch.setattr(migrate, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(REPO)
    assert migrate.migrations_dir() == REPO / "migrations"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="LETHE_MIGRATIONS_DIR"):
        migrate.migrations_dir()
    monkeypatch.setenv("LETHE_MIGRATIONS_DIR", str(REPO / "migrations"))
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    migrate.upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)


def _backfill(url: str) -> None:
    config = migrate.alembic_config(url)
    revision = ScriptDirectory.from_config(config).get_revision("0002")
    assert revision is not None
    before = revision.down_revision
    assert isinstance(before, str)
    command.upgrade(config, before)
    engine = create_engine(url)
    now = "2026-01-01 00:00:00+00:00"
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO models (id, name, workload, tasks, method, method_config, settings, status,"
                    " base_files, last_fencing_token, created_at)"
                    " VALUES (1, 'm', 'w', '[\"a\", \"b\"]', 'ssd', '{}', '{}', 'ready', '{}', 0, :now)"
                ),
                {"now": now},
            )
            requests = [
                ("r1", "client", "c0", None, '["a"]'),  # partial: marked c0 forgotten before 0002
                ("r2", "client", "c1", None, '["a", "b"]'),
                ("r3", "task", None, '["s4"]', '["b"]'),
            ]
            insert_request = text(
                "INSERT INTO forget_requests (seq, id, model_id, kind, client_id, sample_ids, tasks,"
                " subject_key, status, idempotency_key, payload_hash, received_at, due_at,"
                " updated_at, completed_at, attempts) VALUES (:seq, :id, 1, :kind, :client, :samples,"
                " :tasks, :id, 'completed', :id, 'h', :now, :now, :now, :now, 1)"
            )
            for seq, (rid, kind, client, samples, tasks) in enumerate(requests, start=1):
                values = {"seq": seq, "id": rid, "kind": kind, "client": client, "samples": samples}
                conn.execute(insert_request, {**values, "tasks": tasks, "now": now})
            insert_subject = text(
                "INSERT INTO subjects (id, model_id, client_id, sample_count, status,"
                " forgotten_by_request_id, forgotten_at) VALUES (:id, 1, :client, 2, :status, :by, :at)"
            )
            for sid, client, by in (1, "c0", "r1"), (2, "c1", "r2"), (3, "c2", None):
                status = "forgotten" if by else "active"
                conn.execute(
                    insert_subject,
                    {"id": sid, "client": client, "status": status, "by": by, "at": now if by else None},
                )
            # an event of r1: a table rebuild with foreign keys on would cascade-delete it
            conn.execute(
                text(
                    "INSERT INTO request_events (id, request_id, type, actor, detail, at, prev_hash, hash)"
                    " VALUES (1, 'r1', 'received', 't', '{}', :now, 'p', 'h')"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO samples (id, model_id, sample_id, client_id, purged, purged_tasks)"
                    " VALUES (1, 1, 's4', 'c2', false, '[]')"
                )
            )
        command.upgrade(config, "0002")
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT client_id, status, forgotten_by_request_id FROM subjects ORDER BY id")
            ).all()
            assert [tuple(r) for r in rows] == [
                ("c0", "active", None),
                ("c1", "forgotten", "r2"),
                ("c2", "active", None),
            ]
            forgotten = conn.execute(text("SELECT forgotten_tasks FROM subjects ORDER BY id")).scalars().all()
            assert [json.loads(t) if isinstance(t, str) else t for t in forgotten] == [["a"], ["a", "b"], []]
            assert conn.execute(text("SELECT count(*) FROM request_events")).scalar_one() == 1
            sample = conn.execute(text("SELECT forgotten_tasks FROM samples")).scalar_one()
            assert (json.loads(sample) if isinstance(sample, str) else sample) == ["b"]
    finally:
        engine.dispose()


def test_0002_backfills_what_was_forgotten_sqlite(tmp_path: Path) -> None:
    """Issue 9 item 1: a client marked forgotten by a request for some of its tasks (the defect) is
    active again after the upgrade, forgotten for those tasks; full erasures and task requests are
    carried over."""
    _backfill(f"sqlite:///{tmp_path / 'lethe.db'}")


@pytest.mark.postgres
def test_0002_backfills_what_was_forgotten_postgres(make_postgres_database: Callable[[], str]) -> None:
    _backfill(make_postgres_database())
