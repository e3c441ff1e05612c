"""Lethe's worker side: the Celery app, the round pipeline, artifact storage and the ML core.

Importing this package is cheap: torch is only imported by the modules that need it.
"""
