"""Pydantic v2 schemas of the HTTP API."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    StringConstraints,
    field_validator,
)

from service.db.models import MODEL_NAME_PATTERN

IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
#: Printable ASCII: an idempotency key is an opaque token such as a UUID.
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,200}$"

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]

#: A UUID in its 8-4-4-4-12 hex form, in any case (request and webhook ids are stored lower-case).
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
#: A webhook delivery id (``msg_`` and 32 hex digits), in any case.
_DELIVERY_ID = re.compile(r"msg_[0-9a-f]{32}", re.IGNORECASE)


def canonical_id(value: str) -> str:
    """A UUID (or delivery id) as stored, lower-case, whatever case it was given in; any other
    value unchanged (it names nothing: the caller answers 404 as before)."""
    if _UUID.fullmatch(value) or _DELIVERY_ID.fullmatch(value):
        return value.lower()
    return value


#: An id taken from a path (a request, webhook or delivery id): accepted in any case.
PathId = Annotated[str, AfterValidator(canonical_id)]
RequestStatus = Literal[
    "received", "queued", "running", "verifying", "completed", "failed", "cancelled", "rejected"
]


#: Nesting allowed inside a free-form JSON object (settings need a few levels, not hundreds).
MAX_JSON_DEPTH = 20


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists / objects nest more than ``limit`` levels (breadth-first: no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
        ]
    return any(isinstance(item, dict | list) for item in level)


def _plain_json(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` (the response serializer has a depth
    limit), and what JSON parsers accept but JSON cannot carry (NaN, Infinity, lone surrogates)."""
    if _nests_deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"must not nest more than {MAX_JSON_DEPTH} levels deep")
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise ValueError("must be plain JSON: no NaN or Infinity, no lone UTF-16 surrogates") from None
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_plain_json)]
MethodName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,99}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


ExternalId = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f]{1,200}$")]
SampleIds = Annotated[list[Identifier], Field(min_length=1, max_length=10_000)]
Tasks = Annotated[list[Identifier], Field(min_length=1, max_length=100)]


class ClientForgetRequestIn(_In):
    """Forget a client: all its samples, or (with ``tasks``) those tasks' supervision of them."""

    model: ModelName
    kind: Literal["client"]
    client_id: Identifier
    tasks: Tasks | None = Field(default=None, description="Default: all the model's tasks.")
    external_id: ExternalId | None = Field(
        default=None, description="The caller's own reference (e.g. a DSR ticket)."
    )


class TaskForgetRequestIn(_In):
    """Forget some tasks' supervision of some samples."""

    model: ModelName
    kind: Literal["task"]
    sample_ids: SampleIds
    tasks: Tasks
    external_id: ExternalId | None = Field(
        default=None, description="The caller's own reference (e.g. a DSR ticket)."
    )


#: The values of ``kind``; a validation error's location names the kind first (see problems.py).
FORGET_REQUEST_KINDS = ("client", "task")


class ForgetRequestIn(
    RootModel[Annotated[ClientForgetRequestIn | TaskForgetRequestIn, Field(discriminator="kind")]]
):
    """Forget a client, or some tasks' supervision of some samples: the fields depend on ``kind``."""


class _Out(BaseModel):
    @classmethod
    def from_row(cls, row: object, **values: Any) -> Self:
        """This schema with each field read from ``row``'s attribute of the same name, except the
        fields given in ``values``."""
        unknown = values.keys() - cls.model_fields.keys()
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        return cls.model_validate(
            {name: values[name] if name in values else getattr(row, name) for name in cls.model_fields}
        )


RoundStage = Literal["partitions", "ssd", "update", "acceptance", "audit", "publish"]


class RoundProgressOut(BaseModel):
    """Where the request's round is (written by the worker at most every 0.5 s)."""

    round_id: int
    stage: RoundStage = Field(
        description="partitions → ssd → update → acceptance → audit → publish (ssd: methods that run it)."
    )
    step: int = Field(
        description="Step within the stage: request k of the round (partitions, audit), epoch k (update); 0 "
        "when the stage has no steps."
    )
    of: int = Field(
        description="Steps in the stage (0: not counted; update: at most, early stopping may end it)."
    )
    updated_at: datetime


class ForgetRequestOut(_Out):
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
    attempts: int = Field(description="Rounds of this request that ran (claimed), not counting resumptions.")
    crashes: int = Field(description="Times its round's worker was lost (lease expired) and it was resumed.")
    not_before: datetime | None = Field(description="A requeued request is not retried before this time.")
    error: str | None
    version: int | None = Field(description="The adapter version that no longer contains the subject.")
    extended_months: int = Field(description="Months the deadline was extended by (at most 2).")
    progress: RoundProgressOut | None = Field(
        default=None,
        description="The stage of its round while running or verifying; for a failed request the stage its "
        "last round reached; null otherwise.",
    )


class DeadlineExtensionIn(_In):
    #: strict: ``true`` or ``"1"`` is not a number of months (422), not one month
    months: int = Field(strict=True, ge=1, le=2, description="Further months (at most two in total).")
    reason: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f]{1,1000}$")] = Field(
        description="Why (GDPR Art. 12(3): complexity and number of requests); recorded as an event."
    )


class ForgetRequestPage(BaseModel):
    items: list[ForgetRequestOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


#: Most items in one ``POST /v1/forget-requests/bulk``.
MAX_BULK_ITEMS = 1000


class BulkItemIn(_In):
    """One item of a bulk submission: what ``POST /v1/forget-requests`` takes, header and body."""

    idempotency_key: Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)] = Field(
        description="As the `Idempotency-Key` header of a single submission (scoped to the API key)."
    )
    request: dict[str, Any] = Field(description="A forget request, as the body of a single submission.")


class BulkForgetRequestsIn(_In):
    items: list[Any] = Field(
        min_length=1,
        max_length=MAX_BULK_ITEMS,
        description="1 to 1,000 objects `{idempotency_key, request}` (BulkItemIn). Each is validated "
        "on its own: a malformed item gets a 422 problem as its result, the others go on.",
    )


class BulkItemOut(BaseModel):
    index: int = Field(description="The item's position in the submitted list.")
    status: int = Field(
        description="What the single submission would have answered: 201 created, 200 a replay of the "
        "item's idempotency key or merged into a pending request, 4xx: see `problem`."
    )
    request: ForgetRequestOut | None = None
    problem: dict[str, Any] | None = Field(default=None, description="An RFC 9457 problem object.")


class BulkForgetRequestsOut(BaseModel):
    items: list[BulkItemOut]
    created: int
    unchanged: int = Field(description="Items answered 200 (replayed or merged).")
    failed: int


class EventOut(_Out):
    id: int
    type: str
    status: str | None
    actor: str
    at: datetime
    detail: dict[str, Any]
    seq: int | None = Field(
        description="Position in the hash chain; null while the event is pending (not chained yet)"
    )
    prev_hash: str | None = Field(description="Hash of the chain's event before this one; null while pending")
    hash: str | None = Field(description="SHA-256 of this event's canonical JSON; null while pending")


class EvidenceOut(_Out):
    request_id: str
    round_id: int
    version: int
    created_at: datetime
    payload: dict[str, Any]


class ModelIn(_In):
    name: ModelName
    workload: Identifier
    workload_options: JsonObject = Field(
        default_factory=dict,
        description="Keyword arguments of the workload's constructor (e.g. a data path, a seed, sizes); "
        "keys are identifiers, at most 16 KiB as JSON. A value the workload rejects fails the model's "
        "preparation (status `failed`, the reason in `error`).",
    )
    method: MethodName | None = Field(
        default=None, description="Unlearning method (`GET /v1/admin/methods`); default: `default`."
    )
    method_config: JsonObject = Field(default_factory=dict)
    settings: JsonObject = Field(default_factory=dict)


class ApiKeyIn(_In):
    scopes: list[Literal["submit", "admin", "serve"]] = Field(min_length=1, max_length=3)
    name: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f-\x9f]{1,200}$")] | None = Field(
        default=None, description="A label for the key."
    )


class ApiKeyOut(_Out):
    id: int
    prefix: str = Field(description="The secret's first characters, to recognise it; not a credential.")
    name: str | None
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None = Field(description="Last authenticated call (to within a minute).")
    rotated_at: datetime | None
    revoked_at: datetime | None


class ApiKeyWithSecret(ApiKeyOut):
    key: str = Field(description="The secret: shown this once, only its SHA-256 is stored.")


def _null_not_offered(schema: dict[str, Any]) -> None:
    """The JSON Schema of a field whose ``None`` stands for "left out" only: drop the null branch
    (and the null default: left out, the field keeps the stored value)."""
    schema.pop("default", None)
    variants = [v for v in schema.pop("anyOf", []) if v != {"type": "null"}]
    if len(variants) == 1:
        schema.update(variants[0])
    elif variants:
        schema["anyOf"] = variants


class ModelUpdateIn(_In):
    """What to replace; a field left out keeps its value (``null`` is not a value: 422). Applies
    from the next round."""

    # None stands for "left out" only: the schema does not offer null, and the validator refuses it
    method: MethodName | None = Field(
        default=None, description="A method of `GET /v1/admin/methods`.", json_schema_extra=_null_not_offered
    )
    method_config: JsonObject | None = Field(
        default=None, description="The method's own settings block.", json_schema_extra=_null_not_offered
    )
    settings: JsonObject | None = Field(
        default=None,
        description="All per-model settings (`pretrain`, `lora`, `train` cannot change).",
        json_schema_extra=_null_not_offered,
    )

    @field_validator("method", "method_config", "settings", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null: leave the field out to keep its value")
        return value


class ModelEventOut(_Out):
    id: int
    type: Literal["registered", "reconfigured"]
    actor: str
    at: datetime
    detail: dict[str, Any] = Field(
        description="`registered`: workload, workload_options, method, method_config, settings; "
        "`reconfigured`: `changes` as {field: {from, to}}."
    )


class MethodCatalogue(BaseModel):
    methods: dict[str, dict[str, Any]] = Field(
        description="Per method, the JSON Schema of its `method_config` (its own settings block)."
    )
    settings: dict[str, Any] = Field(description="The JSON Schema of a model's `settings`.")


class CertificationOut(_Out):
    """A retrain-based check of a published version (docs/api.md, "Certification")."""

    id: int
    model: str
    version: int
    status: Literal["requested", "running", "certified", "flagged", "incomplete", "failed"]
    trigger: Literal["on_demand", "sampled"]
    requested_by: str
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    #: ``within_bounds`` / ``out_of_bounds`` / ``incomplete`` once done; the full comparison is in
    #: the evidence of the version's requests
    verdict: str | None
    within_bounds: bool | None
    error: str | None


class VersionSummary(_Out):
    version: int
    parent: int | None
    status: Literal["active", "withdrawn"]
    created_at: datetime
    withdrawn_at: datetime | None
    round_id: int | None
    #: the version's latest certification (null: never certified)
    certification: CertificationOut | None = None
    #: its latest certification found it out of bounds: admins should look at it
    flagged: bool = False


class ModelOut(_Out):
    name: str
    workload: str
    workload_options: dict[str, Any]
    tasks: list[str]
    method: str
    method_config: dict[str, Any]
    settings: dict[str, Any]
    status: Literal["preparing", "ready", "failed"]
    error: str | None
    created_at: datetime
    prepared_at: datetime | None
    latest_version: int | None
    halted_reason: str | None = Field(
        description="Set when a worker found the database and the artifacts disagree; no round runs "
        "and no adapter directory is deleted until they agree (docs/operations.md, restore)."
    )
    halted_at: datetime | None


class ModelDetail(ModelOut):
    subjects: int
    forgotten_subjects: int
    versions: list[VersionSummary]


class ClientOut(BaseModel):
    """A client (subject) of a model: whose data it was trained on."""

    client_id: str
    status: Literal["active", "forgotten"]
    samples: int = Field(description="Samples registered for the client (purged ones too).")
    forgotten_tasks: list[str] = Field(description="Tasks client requests made the model forget.")
    requested: bool = Field(description="Whether any forget request (whatever its status) names the client.")


class ClientPage(BaseModel):
    items: list[ClientOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


class SampleOut(BaseModel):
    """A sample whose inputs are kept (not purged)."""

    sample_id: str
    purged_tasks: list[str] = Field(description="Tasks whose label of the sample was deleted.")
    forgotten_tasks: list[str] = Field(description="Tasks task requests made the model forget for it.")


class SamplePage(BaseModel):
    items: list[SampleOut]
    next_cursor: str | None = Field(description="Pass as `cursor` to get the next page; null at the end.")


class LeaseOut(_Out):
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
    overdue: int = Field(description="Open requests (also failed ones) past their deadline.")
    next_due_at: datetime | None = Field(description="The earliest deadline of the open requests.")
    halted_reason: str | None = Field(description="Why workers run no round of this model (null: they do).")


class WorkerOut(_Out):
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
    pending_events: int = Field(
        default=0,
        description="Events committed after the check chained the pending ones: not yet in the chain",
    )


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
