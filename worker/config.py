"""Worker-side settings (``LETHE_WORKER_*``), built at worker start-up, never at import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.dispatch import CERTIFY_QUEUE
from service.dispatch import QUEUE as GPU_QUEUE
from worker.blob_cache import DEFAULT_MAX_BYTES as DEFAULT_BLOB_CACHE_MAX_BYTES

__all__ = ["CERTIFY_QUEUE", "GPU_QUEUE", "WorkerSettings"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LETHE_WORKER_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: cuda when this process sees a GPU, else cpu."
    )
    queues: list[str] = Field(
        default_factory=lambda: [GPU_QUEUE, CERTIFY_QUEUE],
        description="Queues this worker consumes; by default rounds and certification (one process "
        "takes one message at a time, so a certification waits for the round before it and the other "
        "way round). Dedicated certification workers: lethe.certify only.",
    )
    soft_time_limit: int = Field(
        default=3600, description="A round (or prepare) running longer is interrupted and retried."
    )
    hard_time_limit: int = Field(
        default=3900, description="A round still running after this kills its process (restarted)."
    )
    heartbeat_seconds: float = Field(default=10.0, description="Worker heartbeat and sweep period.")
    sweep: bool = Field(default=True, description="This worker also runs the sweeper (wakes models).")
    blob_cache_max_bytes: int = Field(
        default=DEFAULT_BLOB_CACHE_MAX_BYTES,
        ge=0,
        description="Bytes of downloaded object-store files kept ($LETHE_HOME/blob-cache); the least "
        "recently used are evicted beyond it after each fetch.",
    )
    gc_min_age_seconds: float = Field(default=0.0, description="Orphan directories younger are kept.")
    seed: int = Field(default=0, description="Seed of the engine's randomness (recorded in evidence).")
    torch_threads: int | None = Field(
        default=1,
        description="torch intra-op threads (None: torch's default, one per core). 1 by default: the "
        "built-in workloads' networks are small, and extra threads spin on a shared CPU (measured: "
        "2 threads on a busy 2-core machine made rounds 10-20x slower). Raise it for large CPU models.",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of this worker's Prometheus exporter (/metrics); 0: off."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the worker's exporter listens on.")
    fault_pause: str | None = Field(
        default=None, description="Tests only: '<step>:<seconds>' pauses a round at that step (crash tests)."
    )

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.hard_time_limit <= self.soft_time_limit:
            raise ValueError("hard_time_limit must exceed soft_time_limit")
        return self

    @property
    def visibility_timeout(self) -> int:
        """Redis redelivers an unacknowledged message after this: longer than any round can run."""
        return self.hard_time_limit + 600
