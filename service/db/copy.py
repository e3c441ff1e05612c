"""Insert many rows in one round trip: PostgreSQL ``COPY … FROM STDIN``, else ``executemany``.

SQLAlchemy's batched ``INSERT … VALUES (…), (…)`` makes psycopg rewrite a statement with thousands
of placeholders in Python (most of a 1,000-item bulk submission's time); ``COPY`` streams the rows
instead. Values go through each column's bind processing (JSON, UTC datetimes) as an INSERT's do,
and rows are inserted in the order given (a serial key follows that order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import psycopg
from sqlalchemy import Table, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session

#: Fewer rows than this go through a plain INSERT: COPY costs two round trips of its own.
COPY_FROM = 50


def insert_rows(session: Session, model: type[DeclarativeBase], rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (column name -> value; every row with the same columns) into ``model``'s
    table. A unique or foreign key violation raises SQLAlchemy's :class:`IntegrityError`, as a
    flush does. The rows are not loaded into the session."""
    if not rows:
        return
    table = cast(Table, model.__table__)
    session.flush()
    connection = session.connection()
    if connection.dialect.name != "postgresql" or len(rows) < COPY_FROM:
        connection.execute(insert(table), list(rows))
        return
    names = list(rows[0])
    dialect = connection.dialect
    processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
    statement = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
    dbapi: Any = connection.connection.dbapi_connection  # psycopg's, on this dialect
    try:
        with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [
                        value if process is None else process(value)
                        for value, process in zip((row[n] for n in names), processors, strict=True)
                    ]
                )
    except psycopg.IntegrityError as error:
        raise IntegrityError(statement, None, error) from error
