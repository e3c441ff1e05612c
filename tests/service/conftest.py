"""Service fixtures: a migrated database per backend (SQLite always, PostgreSQL when available).

Each backend's database is migrated once per session with the real Alembic chain; every test
starts from empty tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.db import migrate
from service.db.models import Base
from service.db.session import create_db_engine, make_session_factory, transaction
from service.repositories import keys as keys_repo
from service.repositories import models as models_repo
from service.rounds import FileDigest, register_prepared_model
from service.settings import Settings
from tests.service.helpers import uvicorn_in_thread

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'lethe.db'}"
    else:
        make: Callable[[], str] = request.getfixturevalue("make_postgres_database")
        url = make()
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def _engines() -> Iterator[dict[str, Engine]]:
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def engine(database_url: str, _engines: dict[str, Engine]) -> Engine:
    engine = _engines.get(database_url)
    if engine is None:
        engine = _engines[database_url] = create_db_engine(database_url)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                conn.execute(text(f"DELETE FROM {table}"))
    return engine


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


DIGEST = FileDigest(sha256="0" * 64, size=1)


def seed_ready_model(
    factory: sessionmaker[Session],
    name: str = "digits",
    *,
    clients: int = 3,
    samples_per_client: int = 4,
    tasks: tuple[str, ...] = ("digit", "parity"),
) -> None:
    """A registered and prepared model: clients c0.., samples s00000.., v1 under ``<name>/adapters/v1``."""
    subjects = {
        f"c{c}": [f"s{c * samples_per_client + i:05d}" for i in range(samples_per_client)]
        for c in range(clients)
    }
    with transaction(factory) as session:
        models_repo.create_model(
            session, name, workload="digits-clients", method="ssd", method_config={"alpha": 1.0}, settings={}
        )
        register_prepared_model(
            session,
            name,
            subjects=subjects,
            location=f"{name}/adapters/v1",
            files={"adapter_model.safetensors": DIGEST},
            evidence={"note": "v1"},
            tasks=list(tasks),
            base_location=f"{name}/base",
            base_files={"model.safetensors": DIGEST},
        )


@pytest.fixture
def ready_model(sessions: sessionmaker[Session]) -> str:
    seed_ready_model(sessions)
    return "digits"


@pytest.fixture
def tmp_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def settings(database_url: str, tmp_path: Path, engine: Engine) -> Settings:
    """Settings of an API on the migrated test database (emptied), without a broker."""
    return Settings(
        home=tmp_path / "home",
        database_url=database_url,
        artifacts_dir=tmp_path / "artifacts",
        broker_url=None,
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@dataclass(frozen=True)
class Keys:
    submit: dict[str, str]
    other_submit: dict[str, str]
    admin: dict[str, str]
    serve: dict[str, str]


@pytest.fixture
def keys(sessions: sessionmaker[Session]) -> Keys:
    def header(*scopes: str) -> dict[str, str]:
        with transaction(sessions) as session:
            _, secret = keys_repo.create_key(session, scopes)
        return {"Authorization": f"Bearer {secret}"}

    return Keys(
        submit=header("submit"), other_submit=header("submit"), admin=header("admin"), serve=header("serve")
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``LETHE_HOME`` is ``tmp_path`` and no database or broker is configured (the CLI's defaults)."""
    monkeypatch.setenv("LETHE_HOME", str(tmp_path))
    for name in ("LETHE_DATABASE_URL", "LETHE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    """The API on a real uvicorn server in a thread; yields its base URL."""
    with uvicorn_in_thread(settings, ws="none") as port:
        yield f"http://127.0.0.1:{port}"
