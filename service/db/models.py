"""SQLAlchemy 2 typed models: the system of record.

Statuses are plain strings guarded by CHECK constraints; the allowed values are the ``*_STATUSES``
tuples below. Every constraint and index has a name (see ``NAMING_CONVENTION``), so that Alembic
migrations are reproducible on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.db.types import UTCDateTime, utcnow

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_STATUSES: Final = ("preparing", "ready", "failed")
SUBJECT_STATUSES: Final = ("active", "forgotten")
REQUEST_KINDS: Final = ("client", "task")
REQUEST_STATUSES: Final = (
    "received",
    "queued",
    "running",
    "verifying",
    "completed",
    "failed",
    "cancelled",
    "rejected",
    # A submission for a subject with a pending request: its own request (own id, key, external id)
    # that follows the pending one (``merged_into``); the API presents that request's progress.
    "merged",
)
#: Requests in these statuses are "pending": a second request for the same subject is not created.
ACTIVE_REQUEST_STATUSES: Final = ("received", "queued", "running", "verifying")
ROUND_STATUSES: Final = ("running", "verifying", "completed", "failed")
#: At most one round per model is in one of these statuses (partial unique index).
LIVE_ROUND_STATUSES: Final = ("running", "verifying")
#: The stages a round reports while it runs, in order (``rounds.progress_stage``; docs/api.md).
ROUND_STAGES: Final = ("partitions", "ssd", "update", "acceptance", "audit", "publish")
VERSION_STATUSES: Final = ("active", "withdrawn")
#: ``requested`` → ``running`` → a verdict (``certified``, ``flagged``: out of bounds, ``incomplete``:
#: forget-set terms unavailable) or ``failed``.
CERTIFICATION_STATUSES: Final = ("requested", "running", "certified", "flagged", "incomplete", "failed")
#: At most one certification per version is in one of these statuses (partial unique index).
LIVE_CERTIFICATION_STATUSES: Final = ("requested", "running")
CERTIFICATION_TRIGGERS: Final = ("on_demand", "sampled")
SCOPES: Final = ("submit", "admin", "serve")
#: Completed requests whose raw data is not recorded as purged (a partial index).
UNPURGED: Final = "status = 'completed' AND purged_at IS NULL"
#: A model's name; it appears in URLs and directory names.
MODEL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,62}$"

JSONDict = dict[str, Any]


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _status_check(statuses: tuple[str, ...]) -> CheckConstraint:
    return CheckConstraint(_in("status", statuses), name="status")


def _unique_while(name: str, *columns: str, statuses: tuple[str, ...]) -> Index:
    """A partial unique index over the rows in ``statuses`` (SQLite and PostgreSQL alike)."""
    where = text(_in("status", statuses))
    return Index(name, *columns, unique=True, sqlite_where=where, postgresql_where=where)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), JSONDict: JSON(), list[str]: JSON()}  # noqa: RUF012


class Model(Base):
    """A registered model: a workload, the unlearning method and its settings."""

    __tablename__ = "models"
    __table_args__ = (_status_check(MODEL_STATUSES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    workload: Mapped[str] = mapped_column(String(200))
    tasks: Mapped[list[str]] = mapped_column(default=list)
    method: Mapped[str] = mapped_column(String(100))
    method_config: Mapped[JSONDict] = mapped_column(default=dict)
    settings: Mapped[JSONDict] = mapped_column(default=dict)
    #: Keyword arguments of the workload's constructor (data path, seed, sizes; docs/workloads.md).
    workload_options: Mapped[JSONDict] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="preparing")
    error: Mapped[str | None] = mapped_column(Text)
    #: Directory of the frozen base model, relative to the artifacts directory.
    base_location: Mapped[str | None] = mapped_column(String(500))
    #: ``{file name: {"sha256": hex, "size": bytes}}`` of the base model's files.
    base_files: Mapped[JSONDict] = mapped_column(default=dict)
    #: Last fencing token handed out for this model's rounds (strictly increasing).
    last_fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    prepared_at: Mapped[datetime | None]
    #: Set by a worker that found the database and the artifacts disagree (e.g. after a mismatched
    #: restore): no round runs and no adapter directory is deleted until they agree again.
    halted_reason: Mapped[str | None] = mapped_column(Text)
    halted_at: Mapped[datetime | None]


class Subject(Base):
    """A client of a model: whose data it was trained on."""

    __tablename__ = "subjects"
    __table_args__ = (
        UniqueConstraint("model_id", "client_id"),
        _status_check(SUBJECT_STATUSES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    client_id: Mapped[str] = mapped_column(String(200))
    sample_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="active")
    forgotten_by_request_id: Mapped[str | None] = mapped_column(ForeignKey("forget_requests.id"))
    forgotten_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]
    #: Tasks the client was forgotten for by client requests (all of them once ``forgotten``).
    forgotten_tasks: Mapped[list[str]] = mapped_column(default=list)


class Sample(Base):
    """A training sample of a model, so that the API validates sample ids without the worker."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("model_id", "sample_id"),
        Index("ix_samples_model_id_client_id", "model_id", "client_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    sample_id: Mapped[str] = mapped_column(String(200))
    client_id: Mapped[str] = mapped_column(String(200))
    #: The whole sample was deleted from the dataset store (its client was forgotten, or every
    #: task's label of it was).
    purged: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Tasks whose label of this sample was deleted (per-task forgetting).
    purged_tasks: Mapped[list[str]] = mapped_column(default=list)
    #: Tasks this sample was forgotten for by task requests (published versions no longer hold them).
    forgotten_tasks: Mapped[list[str]] = mapped_column(default=list)


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret, with its scopes."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(200))
    scopes: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    #: Last successful authentication (updated at most once a minute).
    last_used_at: Mapped[datetime | None]
    #: Last time the secret was replaced (``lethe keys rotate``); the key keeps its id and requests.
    rotated_at: Mapped[datetime | None]


class ForgetRequest(Base):
    """One right-to-be-forgotten request; ``seq`` is the arrival order."""

    __tablename__ = "forget_requests"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key"),
        CheckConstraint(_in("kind", REQUEST_KINDS), name="kind"),
        _status_check(REQUEST_STATUSES),
        Index("ix_forget_requests_model_id_status_seq", "model_id", "status", "seq"),
        # Completed requests whose purge is not recorded yet: what every wake's reconcile reads.
        Index(
            "ix_forget_requests_unpurged",
            "model_id",
            "seq",
            sqlite_where=text(UNPURGED),
            postgresql_where=text(UNPURGED),
        ),
        # One pending request per subject and model: a second submission returns the first.
        _unique_while(
            "uq_forget_requests_active_subject", "model_id", "subject_key", statuses=ACTIVE_REQUEST_STATUSES
        ),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    client_id: Mapped[str | None] = mapped_column(String(200))
    sample_ids: Mapped[list[str] | None] = mapped_column(JSON)
    tasks: Mapped[list[str]] = mapped_column(default=list)
    #: Canonical description of what is forgotten; equal for equal subjects.
    subject_key: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="received")
    idempotency_key: Mapped[str] = mapped_column(String(200))
    payload_hash: Mapped[str] = mapped_column(String(64))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    external_id: Mapped[str | None] = mapped_column(String(200))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: One calendar month after receipt plus ``extended_months`` (GDPR Art. 12(3)).
    due_at: Mapped[datetime] = mapped_column(index=True)
    #: Months the deadline was extended by (at most two; each extension is an event with its reason).
    extended_months: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    #: Rounds of this request that ended in a method error (capped by ``LETHE_MAX_ATTEMPTS``).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Rounds of this request whose worker was lost (lease expired), counted apart from attempts.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    #: A requeued request is not claimed before this time (retry backoff).
    not_before: Mapped[datetime | None]
    #: When its raw data was recorded as purged (completed requests; None: not yet, or not checked).
    purged_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: The round that currently holds (or last held) this request.
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    #: The adapter version that no longer contains the subject (when completed).
    version_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    #: Status ``merged``: the pending request of the same subject this one follows.
    merged_into: Mapped[str | None] = mapped_column(ForeignKey("forget_requests.id"), index=True)


class RequestEvent(Base):
    """Append-only lifecycle event; all events form one SHA-256 hash chain, ordered by ``seq``.

    A submission writes its events *pending* (``seq``, ``prev_hash`` and ``hash`` NULL: no chain
    lock on the POST path); the sequencer links pending events into the chain in ``id`` order
    shortly after (``service.repositories.events``)."""

    __tablename__ = "request_events"
    __table_args__ = (
        # what the sequencer reads: the few events not chained yet
        Index(
            "ix_request_events_pending",
            "id",
            sqlite_where=text("seq IS NULL"),
            postgresql_where=text("seq IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Position in the chain (1, 2, …); NULL while the event is pending.
    seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("forget_requests.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str | None] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200))
    detail: Mapped[JSONDict] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class Round(Base):
    """One unlearning round of a model: covered requests, lease and fencing token."""

    __tablename__ = "rounds"
    __table_args__ = (
        _status_check(ROUND_STATUSES),
        # The database, not worker goodwill, allows one live round per model.
        _unique_while("uq_rounds_one_live_per_model", "model_id", statuses=LIVE_ROUND_STATUSES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    method: Mapped[str] = mapped_column(String(100))
    method_config: Mapped[JSONDict] = mapped_column(default=dict)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    #: The model's settings when the round was claimed (a resumed round keeps them); NULL: a round
    #: claimed before they were recorded, which reads the model's.
    settings: Mapped[JSONDict | None] = mapped_column(JSON)
    #: Where the round is (docs/api.md, "Progress"): written by the worker, throttled; NULL until the
    #: engine reports. ``progress_step`` of ``progress_of`` (0 of 0: the stage has no steps).
    progress_stage: Mapped[str | None] = mapped_column(String(32))
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_of: Mapped[int | None] = mapped_column(Integer)
    progress_at: Mapped[datetime | None]


class RoundRequest(Base):
    """The requests a round covers, in arrival order."""

    __tablename__ = "round_requests"

    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("forget_requests.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class AdapterVersion(Base):
    """An immutable adapter version of a model (v1 = the original)."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        _status_check(VERSION_STATUSES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    #: Directory of the version's files, relative to the artifacts directory.
    location: Mapped[str] = mapped_column(String(500))
    #: ``{file name: {"sha256": hex, "size": bytes}}``.
    files: Mapped[JSONDict] = mapped_column(default=dict)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"))
    status: Mapped[str] = mapped_column(String(16), default="active")
    #: Evidence of a version not produced by a request (v1: the preparation's audit).
    evidence: Mapped[JSONDict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    withdrawn_at: Mapped[datetime | None]


class Evidence(Base):
    """The audit of one request in the round that completed it."""

    __tablename__ = "evidence"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("forget_requests.id", ondelete="CASCADE"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    payload: Mapped[JSONDict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """A worker process and its last heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    queues: Mapped[list[str]] = mapped_column(default=list)
    state: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelEvent(Base):
    """Append-only history of a model's configuration: registered, reconfigured (who, when, what)."""

    __tablename__ = "model_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    detail: Mapped[JSONDict] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Certification(Base):
    """A retrain-based check of a published adapter version, run off the request path."""

    __tablename__ = "certifications"
    __table_args__ = (
        _status_check(CERTIFICATION_STATUSES),
        CheckConstraint(_in("trigger", CERTIFICATION_TRIGGERS), name="trigger"),
        _unique_while(
            "uq_certifications_live_per_version", "version_id", statuses=LIVE_CERTIFICATION_STATUSES
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="requested")
    trigger: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[str] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The verdict and the comparison with the retrain (``worker.unlearning.certify``), when done.
    result: Mapped[JSONDict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


#: Events a webhook may subscribe to (``POST /v1/webhooks`` ``events``; default: all).
WEBHOOK_EVENTS: Final = ("forget_request.completed", "forget_request.failed", "certification.finished")
#: ``pending`` (due at ``next_attempt_at``) → ``delivered`` (a 2xx) or ``failed`` (attempts used up).
DELIVERY_STATUSES: Final = ("pending", "delivered", "failed")


class Webhook(Base):
    """An endpoint an API key registered for the results of its requests.

    The signing secret is stored encrypted (AES-GCM under the server's webhook key, the row id as
    associated data): the server must sign with it, so it cannot be hashed like an API key."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[str]] = mapped_column(default=list)
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook (the outbox): written in the transaction of the state change it
    reports, sent by a worker's webhook thread, retried with backoff. Its id is the ``webhook-id``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        _status_check(DELIVERY_STATUSES),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(64))
    #: The JSON body (``{"type", "timestamp", "data"}``): request ids and statuses, never subject ids.
    payload: Mapped[JSONDict] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    #: Failed attempts since it was (re)queued; the retry budget (``LETHE_WEBHOOK_MAX_ATTEMPTS``).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """The delivery log: one row per HTTP attempt (status code or error, duration)."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
