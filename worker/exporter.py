"""The worker's Prometheus exporter (``LETHE_WORKER_METRICS_PORT``; 0: off).

It serves the same database queue state as the API's ``/metrics`` plus this process's own series
(round durations, failures, fallbacks, certification results, versions published / withdrawn),
from prometheus-client's HTTP server thread with its own small connection pool.
"""

from __future__ import annotations

from prometheus_client import start_http_server

from service import metrics
from service.db.session import create_db_engine, make_session_factory
from service.settings import Settings


def start_exporter(settings: Settings, *, host: str, port: int) -> None:
    # one connection: scrapes are rare and must not take the rounds' connections
    engine = create_db_engine(
        settings.resolved_database_url, pool_size=1, max_overflow=0, pool_timeout=5.0,
        statement_timeout_ms=settings.db_statement_timeout_ms or None,
    )  # fmt: skip
    start_http_server(port, addr=host, registry=metrics.build_registry(make_session_factory(engine)))
