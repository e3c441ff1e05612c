"""Submitting forget requests straight through the service layer (no HTTP), for worker tests."""

from __future__ import annotations

from service import lifecycle
from service.db.session import transaction
from worker import pipeline


def submit_client(ctx: pipeline.WorkerContext, model: str, client: str) -> str:
    """Queue a full erasure of ``client`` of ``model`` (idempotency key ``k-<client>``); its id."""
    with transaction(ctx.session_factory) as session:
        result = lifecycle.submit(
            session,
            lifecycle.Submission(model=model, kind="client", client_id=client),
            idempotency_key=f"k-{client}",
            api_key_id=None,
            actor="test",
        )
        return result.request.id
