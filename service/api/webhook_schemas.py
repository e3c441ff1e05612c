"""Schemas of ``/v1/webhooks`` (kept apart from ``schemas.py``: one feature, one module)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, field_validator

from service.api.schemas import _In, _Out
from service.db.models import WEBHOOK_EVENTS

WebhookEvent = Literal["forget_request.completed", "forget_request.failed", "certification.finished"]
ALL_EVENTS: list[WebhookEvent] = list(get_args(WebhookEvent))
assert set(ALL_EVENTS) == set(WEBHOOK_EVENTS)  # the schema and the model name the same events


class WebhookIn(_In):
    url: str = Field(
        min_length=1,
        max_length=2000,
        description="http(s) URL the deliveries are POSTed to (production: https only). Loopback, "
        "private and other non-public addresses are refused unless the server allows them.",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(ALL_EVENTS),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
        description="Events to deliver; default: all.",
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("events must not repeat")
        return value


class WebhookOut(_Out):
    id: str
    url: str
    events: list[str]
    created_at: datetime


class WebhookWithSecret(WebhookOut):
    secret: str = Field(
        description="The signing secret (`whsec_<base64>`): shown this once. The server keeps it "
        "encrypted to sign deliveries; verify `webhook-signature` with it."
    )


class AttemptOut(_Out):
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; null when none came.")
    error: str | None
    duration_ms: int


class DeliveryOut(_Out):
    id: str = Field(description="The `webhook-id` header (the same on every attempt and replay).")
    webhook_id: str
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int = Field(description="Failed attempts since it was queued or replayed.")
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any] = Field(description="The JSON body sent.")
    log: list[AttemptOut] = Field(description="Every attempt, oldest first.")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
