"""Engine and session factory.

SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE``
transactions: every transaction takes the write lock up front, so two writers queue on the busy
timeout instead of failing on a stale snapshot. PostgreSQL gets a pre-pinged pool whose checkout
waits at most ``pool_timeout`` seconds and a ``statement_timeout`` on every connection, so a
request stuck behind a lock or an exhausted pool ends (503) instead of hanging.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own handling is lazy).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_db_engine(
    url: str,
    *,
    echo: bool = False,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    statement_timeout_ms: int | None = None,
) -> Engine:
    """An engine for ``url`` (SQLite file or PostgreSQL), configured for the queue's needs.

    ``statement_timeout_ms`` (PostgreSQL only; None or 0: none) ends any statement running longer.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            echo=echo,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return create_engine(
        parsed,
        echo=echo,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
    )


def create_probe_engine(url: str, *, timeout_seconds: float) -> Engine:
    """An engine for health checks only: a fresh connection per check (no pool to queue on) that
    gives up after ``timeout_seconds``; SQLite without ``BEGIN IMMEDIATE`` (a probe writes nothing
    and must not wait for a writer)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return create_engine(
            parsed, poolclass=NullPool, connect_args={"check_same_thread": False, "timeout": timeout_seconds}
        )
    timeout_ms = max(1, int(timeout_seconds * 1000))
    return create_engine(
        parsed,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": max(1, round(timeout_seconds)),
            "options": f"-c statement_timeout={timeout_ms}",
        },
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that do not expire objects on commit (handy for returning them from a boundary)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
