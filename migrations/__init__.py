"""Alembic migrations: one chain from an empty database."""
