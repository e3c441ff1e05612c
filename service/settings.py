"""Process settings, read from ``LETHE_*`` environment variables.

Built once at start-up (API lifespan, worker start, CLI command), never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LETHE_", extra="ignore")

    home: Path = Field(default=Path(".lethe"), description="Root of the embedded default's state.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file $LETHE_HOME/lethe.db."
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker URL (redis://...). Unset: no broker; requests stay queued "
        "until a broker is configured and the sweeper wakes a worker.",
    )
    artifacts_dir: Path | None = Field(default=None, description="Default: $LETHE_HOME/artifacts.")
    artifact_store: Literal["local", "s3"] = Field(
        default="local",
        description="Where artifacts (base, adapter versions, tombstones, worker state) live: local: "
        "the artifacts directory (shared by API and workers); s3: an S3-compatible bucket (the "
        "workers keep a local copy under the artifacts directory, the API keeps none).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (http://minio:9000); unset: AWS S3."
    )
    s3_bucket: str | None = Field(default=None, description="Bucket of the s3 store (it must exist).")
    s3_prefix: str = Field(default="", description="Key prefix inside the bucket (e.g. lethe/).")
    s3_region: str | None = Field(default=None, description="Region; unset: boto3's default.")
    s3_access_key_id: str | None = Field(
        default=None, description="Unset: boto3's chain (AWS_ACCESS_KEY_ID, profile, instance role)."
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="See s3_access_key_id.")
    data_dir: Path | None = Field(default=None, description="Default: $LETHE_HOME/data.")
    max_body_bytes: int = Field(default=1_048_576, description="Largest accepted request body.")
    lease_seconds: int = Field(
        default=60,
        description="Round lease: a round whose worker died is taken over this long after its last "
        "renewal. The worker renews it every lease_renew_seconds.",
    )
    lease_renew_seconds: float = Field(
        default=15.0, description="How often a running round renews its lease (at most lease_seconds / 4)."
    )
    max_attempts: int = Field(
        default=5, description="Rounds ending in a (retryable) method error before a request fails."
    )
    max_crashes: int = Field(
        default=3, description="Times a round's worker may be lost (lease expired) before its requests fail."
    )
    retry_base_seconds: float = Field(
        default=15.0, description="Backoff before the first retry; doubles per attempt (equal jitter)."
    )
    retry_max_seconds: float = Field(default=300.0, description="Longest backoff between two attempts.")
    max_requests_per_round: int = Field(default=4, description="Queued requests coalesced per round.")
    chain_sequence_interval_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Longest time a submission's events stay pending (not yet in the hash chain) while "
        "an API process runs; 0: no background sequencer (the next append or chain reader chains them).",
    )
    auth_failure_limit: int = Field(
        default=20, ge=1, description="Bad API keys per client address within the window before 429."
    )
    auth_failure_window_seconds: float = Field(
        default=60.0, gt=0, description="Window of the bad-key count (sliding)."
    )
    key_last_used_resolution_seconds: float = Field(
        default=60.0, ge=0, description="A key's last-used time is written at most this often."
    )
    certify_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of rounds certified automatically (retrain reference, off the request path); "
        "the worker keeps a snapshot of those rounds' forget sets until their certification is done.",
    )
    dispatch_timeout_seconds: float = Field(
        default=2.0, description="Broker connect/send timeout of the API's wake-up messages."
    )
    event_digest_key: SecretStr | None = Field(
        default=None,
        description="Secret of the HMAC that stands for a request's external_id in the hash-chained "
        "events; default: a random key kept in $LETHE_HOME/event-digest.key.",
    )

    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="Base URL serving hosts reach the API at (https://lethe.example.com); file URLs "
        "are built from it. Unset: file URLs are relative (never built from the request's Host).",
    )
    trusted_proxies: str | None = Field(
        default=None,
        description="`lethe serve`: comma-separated IPs (or *) whose X-Forwarded-For/-Proto headers "
        "are trusted; unset: proxy headers are ignored.",
    )
    db_pool_size: int = Field(default=5, description="PostgreSQL connections kept per process.")
    db_max_overflow: int = Field(default=10, description="PostgreSQL connections opened beyond the pool.")
    db_pool_timeout_seconds: float = Field(
        default=5.0, description="Longest wait for a pooled connection; then 503 with Retry-After."
    )
    db_statement_timeout_ms: int = Field(
        default=30_000, description="PostgreSQL statement_timeout of every connection (0: none); then 503."
    )
    health_timeout_seconds: float = Field(
        default=2.0, description="/readyz gives up on the database and the broker after this long."
    )
    metrics_enabled: bool = Field(
        default=True, description="Serve GET /metrics (Prometheus, unauthenticated); false: 404."
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="json: one JSON object per line; text: readable lines. Unset: json for `lethe serve` "
        "and `lethe worker`, text for the other commands (the demo's console stays readable).",
    )

    worker_alive_file: Path | None = Field(
        default=None,
        description="File every worker's heartbeat touches and `lethe worker --check` reads the age of; "
        "default: $LETHE_HOME/worker.alive (this stack's workers only). The worker image sets "
        "/tmp/lethe-worker.alive: one per container, as $LETHE_HOME is a volume other containers share.",
    )

    webhook_secret_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Key that encrypts the webhook signing secrets stored in the database (API and "
        "workers must share it); default: a random key kept in $LETHE_HOME/webhook-secret.key.",
    )
    webhook_allow_private_addresses: bool = Field(
        default=False,
        description="Allow webhook URLs whose host is (or resolves to) a loopback, private, "
        "link-local or otherwise non-public address. Off: refused (SSRF). Tests turn it on.",
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of one delivery.")
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="Attempts of one delivery before it is marked failed."
    )
    webhook_retry_base_seconds: float = Field(
        default=30.0, ge=0, description="Backoff after the first failed delivery; doubles per attempt."
    )
    webhook_retry_max_seconds: float = Field(default=3600.0, ge=0, description="Longest backoff.")
    webhook_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often a worker's webhook thread looks for due deliveries."
    )
    webhook_max_per_key: int = Field(default=10, ge=1, description="Webhooks one API key may register.")

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("LETHE_ARTIFACT_STORE=s3 needs LETHE_S3_BUCKET")
        return self

    def create_engine(self) -> Engine:
        """The process's database engine with the pool and statement limits above."""
        from service.db.session import create_db_engine

        return create_db_engine(
            self.resolved_database_url,
            pool_size=self.db_pool_size,
            max_overflow=self.db_max_overflow,
            pool_timeout=self.db_pool_timeout_seconds,
            statement_timeout_ms=self.db_statement_timeout_ms or None,
        )

    @property
    def lease_renew_interval(self) -> float:
        """Seconds between lease renewals: lease_renew_seconds, and at least four per lease."""
        return max(0.1, min(self.lease_renew_seconds, self.lease_seconds / 4))

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'lethe.db'}"

    @property
    def resolved_worker_alive_file(self) -> Path:
        return (self.worker_alive_file or self.resolved_home / "worker.alive").expanduser().resolve()

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.resolved_home / "artifacts").expanduser().resolve()

    @property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.resolved_home / "data").expanduser().resolve()
