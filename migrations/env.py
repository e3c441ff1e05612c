"""Alembic environment: the URL comes from the caller's connection, ``sqlalchemy.url`` or Settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from service.db.models import Base
from service.db.session import create_db_engine
from service.settings import Settings

target_metadata = Base.metadata


def _database_url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    return url or Settings().resolved_database_url


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch migrations rebuild a table (copy, drop, rename): with foreign keys on, dropping a
        # referenced table with rows fails, or cascade-deletes its children (the events!). SQLite
        # ignores this pragma inside a transaction, so it is set before the migrations' one begins.
        _sqlite_pragma(connection, "PRAGMA foreign_keys = OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=sqlite,
    )
    with context.begin_transaction():
        context.run_migrations()
    if sqlite:
        broken = _sqlite_pragma(connection, "PRAGMA foreign_key_check")
        _sqlite_pragma(connection, "PRAGMA foreign_keys = ON")
        if broken:
            raise RuntimeError(f"the migration left rows that break foreign keys: {broken[:5]}")


def _sqlite_pragma(connection: Connection, pragma: str) -> list[object]:
    """Run ``pragma`` on the driver connection itself, outside any SQLAlchemy transaction."""
    driver = connection.connection.driver_connection
    assert driver is not None
    return list(driver.execute(pragma).fetchall())


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    engine = create_db_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
