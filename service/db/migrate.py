"""Run the Alembic migrations programmatically (``lethe migrate``, tests).

The migration scripts live in ``migrations/`` next to ``alembic.ini`` at the repository root (or
the image's working directory, see the Dockerfile); ``LETHE_MIGRATIONS_DIR`` overrides the search.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


def migrations_dir() -> Path:
    """The first of $LETHE_MIGRATIONS_DIR, <repository>/migrations, ./migrations that has env.py."""
    candidates = [REPO_ROOT / "migrations", Path.cwd() / "migrations"]
    override = os.environ.get("LETHE_MIGRATIONS_DIR")
    if override:
        candidates.insert(0, Path(override))
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate.resolve()
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no Alembic migrations found (searched {searched}); set LETHE_MIGRATIONS_DIR")


def alembic_config(database_url: str) -> Config:
    """The repository's Alembic configuration, pointed at ``database_url``."""
    scripts = migrations_dir()
    ini = scripts.parent / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(scripts))
    # ConfigParser interpolation: a literal % in a URL (an escaped password) must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
