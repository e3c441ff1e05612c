"""``GET /metrics``: Prometheus text exposition (docs/operations.md, "Metrics").

Unauthenticated (like the health checks; it names models and workers, never subjects), and off
with ``LETHE_METRICS_ENABLED=false`` (then 404). Not in the OpenAPI document: it is not JSON and
not part of the client API. A plain ``def``: the queue-state queries run in the thread pool.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from service import metrics
from service.api.state import State
from service.errors import NotFoundError

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def get_metrics(state: State) -> Response:
    if not state.settings.metrics_enabled:
        raise NotFoundError("metrics are disabled (LETHE_METRICS_ENABLED=false)")
    body = generate_latest(metrics.build_registry(state.sessions))
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)  # every Prometheus version reads it
