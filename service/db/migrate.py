"""Run the Alembic migrations programmatically (``lethe migrate``, tests).

The migration scripts are the ``migrations`` package, shipped in the wheel as package data
(pyproject.toml): Alembic's ``script_location`` is the package location ``migrations:.``, which
Alembic resolves through importlib.resources, so ``lethe migrate`` works from an installed wheel in
any working directory. ``LETHE_MIGRATIONS_DIR`` overrides it (a directory holding ``env.py``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.pyfiles import coerce_resource_to_filename

#: the ``pkg:dir`` location of the migration scripts: the root of the ``migrations`` package
SCRIPT_LOCATION = "migrations:."


def script_location() -> str:
    """``$LETHE_MIGRATIONS_DIR`` if set, else the package location (:data:`SCRIPT_LOCATION`)."""
    override = os.environ.get("LETHE_MIGRATIONS_DIR")
    if override:
        return str(Path(override).resolve())
    if importlib.util.find_spec("migrations") is None:
        raise FileNotFoundError(
            "no Alembic migrations found: the package `migrations` is not installed; set LETHE_MIGRATIONS_DIR"
        )
    return SCRIPT_LOCATION


def migrations_dir() -> Path:
    """The directory :func:`script_location` names; FileNotFoundError when it has no ``env.py``."""
    location = script_location()
    path = coerce_resource_to_filename(location)
    if not (path / "env.py").is_file():
        raise FileNotFoundError(f"no Alembic migrations in {path} ({location}); set LETHE_MIGRATIONS_DIR")
    return path.resolve()


def alembic_config(database_url: str) -> Config:
    """The Alembic configuration of the migrations, pointed at ``database_url`` (no alembic.ini:
    ``alembic.ini`` at the repository root is for the ``alembic`` command in a checkout)."""
    migrations_dir()  # a clear error now, not Alembic's later
    config = Config()
    config.set_main_option("script_location", script_location())
    config.set_main_option("path_separator", "os")
    # ConfigParser interpolation: a literal % in a URL (an escaped password) must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
