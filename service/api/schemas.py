"""Pydantic v2 schemas of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
RequestStatus = Literal[
    "received", "queued", "running", "verifying", "completed", "failed", "cancelled", "rejected"
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ForgetRequestIn(_In):
    """Forget a client (all its samples), or some tasks' supervision of some samples."""

    model: ModelName
    kind: Literal["client", "task"]
    client_id: Identifier | None = Field(default=None, description="Required for kind `client`.")
    sample_ids: list[Identifier] | None = Field(
        default=None, min_length=1, max_length=10_000, description="Required for kind `task`."
    )
    tasks: list[Identifier] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="Required for kind `task`; for `client` it defaults to all the model's tasks.",
    )
    external_id: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,200}$")] | None = Field(
        default=None, description="The caller's own reference (e.g. a DSR ticket)."
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> ForgetRequestIn:
        if self.kind == "client":
            if self.client_id is None:
                raise ValueError("client_id is required when kind is 'client'")
            if self.sample_ids is not None:
                raise ValueError("sample_ids is only allowed when kind is 'task'")
        else:
            if self.sample_ids is None:
                raise ValueError("sample_ids is required when kind is 'task'")
            if self.tasks is None:
                raise ValueError("tasks is required when kind is 'task'")
            if self.client_id is not None:
                raise ValueError("client_id is only allowed when kind is 'client'")
        return self


class ForgetRequestOut(BaseModel):
    id: str
    model: str
    kind: Literal["client", "task"]
    client_id: str | None
    sample_ids: list[str] | None
    tasks: list[str]
    status: RequestStatus
    external_id: str | None
    received_at: datetime
    due_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    attempts: int
    error: str | None
    version: int | None = Field(description="The adapter version that no longer contains the subject.")


class ForgetRequestPage(BaseModel):
    items: list[ForgetRequestOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


class EventOut(BaseModel):
    id: int
    type: str
    status: str | None
    actor: str
    at: datetime
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class EvidenceOut(BaseModel):
    request_id: str
    round_id: int
    version: int
    created_at: datetime
    payload: dict[str, Any]


class ModelIn(_In):
    name: ModelName
    workload: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    method: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,99}$")] | None = Field(
        default=None, description="Unlearning method; default: the worker's default method."
    )
    method_config: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)


class VersionSummary(BaseModel):
    version: int
    parent: int | None
    status: Literal["active", "withdrawn"]
    created_at: datetime
    withdrawn_at: datetime | None
    round_id: int | None


class ModelOut(BaseModel):
    name: str
    workload: str
    tasks: list[str]
    method: str
    method_config: dict[str, Any]
    settings: dict[str, Any]
    status: Literal["preparing", "ready", "failed"]
    error: str | None
    created_at: datetime
    prepared_at: datetime | None
    latest_version: int | None


class ModelDetail(ModelOut):
    subjects: int
    forgotten_subjects: int
    versions: list[VersionSummary]


class LeaseOut(BaseModel):
    round_id: int
    status: str
    owner: str | None
    expires_at: datetime | None
    fencing_token: int
    attempts: int
    request_ids: list[str]


class QueueEntry(BaseModel):
    model: str
    model_status: str
    pending: int
    oldest_pending_at: datetime | None
    oldest_pending_age_seconds: float | None
    running_round: LeaseOut | None


class WorkerOut(BaseModel):
    id: str
    hostname: str
    queues: list[str]
    state: str
    started_at: datetime
    last_heartbeat_at: datetime
    seconds_since_heartbeat: float


class BrokenEvent(BaseModel):
    event_id: int
    request_id: str
    reason: str


class AuditReport(BaseModel):
    ok: bool
    checked_events: int
    head_hash: str
    first_broken: BrokenEvent | None


class FileOut(BaseModel):
    name: str
    sha256: str
    size: int
    url: str


class AdapterOut(BaseModel):
    model: str
    version: int
    parent: int | None
    status: Literal["active", "withdrawn"]
    created_at: datetime
    files: list[FileOut]


class BaseModelOut(BaseModel):
    model: str
    files: list[FileOut]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    database: Literal["ok"]
    broker: Literal["ok", "unreachable", "not configured"]
