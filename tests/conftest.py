"""Shared fixtures: the throwaway servers started by scripts/test-services.sh.

A test that needs a server skips when its URL is unset, unless ``LETHE_REQUIRE_SERVICES=1`` (CI),
where a missing server is a failure.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url


def _service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        message = f'{variable} is not set (run: eval "$(scripts/test-services.sh start)")'
        if os.environ.get("LETHE_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """A ``postgresql+psycopg://`` URL of a server where tests may CREATE DATABASE."""
    return _service_url("LETHE_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    return _service_url("LETHE_TEST_REDIS_URL")


@pytest.fixture(scope="session")
def s3_server_url() -> Iterator[str]:
    """An S3-compatible server over HTTP: ``LETHE_TEST_S3_URL`` (scripts/test-services.sh starts moto's
    standalone server), else moto's server in a thread of this process (the ``dev`` extra)."""
    if os.environ.get("LETHE_TEST_S3_URL") or os.environ.get("LETHE_REQUIRE_SERVICES") == "1":
        yield _service_url("LETHE_TEST_S3_URL")
        return
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield _service_url("LETHE_TEST_S3_URL")  # skips
        return
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def make_postgres_database(postgres_server_url: str) -> Iterator[Callable[[], str]]:
    """Creates empty databases on the test server (dropped at the end of the session)."""
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"lethe_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
