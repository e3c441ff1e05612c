"""The Alembic chain on real databases: upgrade, downgrade, upgrade again, and no model drift."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
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


def test_migrations_resolve_as_a_package_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10 part 8: ``script_location`` is the package location ``migrations:.`` (resolved through
    importlib.resources), not a path next to a checkout, so an installed wheel migrates from any
    working directory. Defect: the scripts were found only in <repository>/migrations or
    ./migrations (the image had to install the source tree in place)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LETHE_MIGRATIONS_DIR", raising=False)
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    assert migrate.alembic_config(url).get_main_option("script_location") == "migrations:."
    package = Path(str(importlib.resources.files("migrations")))
    assert migrate.migrations_dir() == package.resolve() == REPO / "migrations"
    migrate.upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)
    # an override names a directory; one without env.py is a clear error
    monkeypatch.setenv("LETHE_MIGRATIONS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LETHE_MIGRATIONS_DIR"):
        migrate.migrations_dir()
    monkeypatch.setenv("LETHE_MIGRATIONS_DIR", str(REPO / "migrations"))
    assert migrate.migrations_dir() == REPO / "migrations"


def _package_data_patterns() -> tuple[list[str], list[str]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config["packages"]["find"]["include"], config["package-data"]["migrations"]


def test_the_wheel_declares_every_migration_file() -> None:
    """The ``migrations`` package and every file Alembic reads from it (the template, each
    revision: ``versions/`` is no package, so its files travel as package data) are in the wheel."""
    include, data = _package_data_patterns()
    assert any(fnmatch.fnmatch("migrations", pattern) for pattern in include)
    root = REPO / "migrations"
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # the package's own modules travel as modules; everything else must match a package-data pattern
    needed = [p.relative_to(root).as_posix() for p in files if p.parent != root or p.suffix != ".py"]
    assert "script.py.mako" in needed
    assert any(n.startswith("versions/0001") for n in needed)
    missing = [n for n in needed if not any(fnmatch.fnmatch(n, pattern) for pattern in data)]
    assert missing == []


def test_a_built_wheel_migrates(tmp_path: Path) -> None:
    """The wheel (built offline, ~6 s) holds the migrations, and the installed packages alone, with
    no checkout on ``sys.path`` and another working directory, migrate a database."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("service", "worker", "migrations"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=source,
        check=True,
    )
    (wheel,) = tmp_path.glob("lethe-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "migrations/env.py" in names
        assert "migrations/script.py.mako" in names
        assert any(n.startswith("migrations/versions/0001") for n in names)
        archive.extractall(site)
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    code = f"from service.db import migrate; migrate.upgrade({url!r}); print(migrate.migrations_dir())"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LETHE_MIGRATIONS_DIR")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(site / "migrations")
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
