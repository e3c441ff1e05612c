"""Database layer: typed ORM models and the engine / session factory."""
