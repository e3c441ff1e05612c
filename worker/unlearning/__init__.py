"""The unlearning core: a pure library (no database, no Celery) that the worker calls."""
