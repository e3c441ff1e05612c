"""The Alembic chain on real databases: upgrade, downgrade, upgrade again, and no model drift."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

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
