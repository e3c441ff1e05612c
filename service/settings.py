"""Process settings, read from ``LETHE_*`` environment variables.

Built once at start-up (API lifespan, worker start, CLI command), never at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    data_dir: Path | None = Field(default=None, description="Default: $LETHE_HOME/data.")
    max_body_bytes: int = Field(default=1_048_576, description="Largest accepted request body.")
    lease_seconds: int = Field(default=600, description="Round lease; renewed by the worker.")
    max_attempts: int = Field(default=3, description="Attempts per request before it fails.")
    max_requests_per_round: int = Field(default=4, description="Queued requests coalesced per round.")
    sweep_interval_seconds: float = Field(default=15.0, description="Sweeper period.")
    due_days: int = Field(default=30, description="Deadline of a forget request after receipt.")
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

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'lethe.db'}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.resolved_home / "artifacts").expanduser().resolve()

    @property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.resolved_home / "data").expanduser().resolve()
