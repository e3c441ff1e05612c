"""Lethe's system of record: HTTP API, database queue, migrations, auth.

This package never imports torch, peft or the ``worker`` package (see tests/service/test_boundaries.py).
"""
